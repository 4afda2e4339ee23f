"""The files of one leaderboard entry, as bytes: nothing here writes to disk.

An entry is ``submissions/{external_tuning,self_tuning}/<name>/`` in the layout of
mlcommons/submissions_algorithms. Its ``submission.py`` is the package's
``submissions/jit/<name>/submission.py`` with the import of `weight_averaging` replaced by
an import of the copy vendored next to it (`vendor`), which works both when the runner
imports the file as ``submissions_algorithms.submissions.<ruleset>.<name>.submission``
and when it loads it by path (then the folder is registered as a package first).
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
from typing import Dict, List, Tuple

from weight_averaging.algoperf_api import catalog
from weight_averaging.export import readme, vendor

RULESETS = ("external", "self_tuning")
RULESET_FOLDERS = {"external": "external_tuning", "self_tuning": "self_tuning"}
VENDORED = "weight_averaging_vendored"   # the vendored package's name inside an entry
REPO = vendor.PACKAGE_DIR.parent


def version() -> str:
  """The package's ``__version__``, read from its ``__init__.py``."""
  tree = ast.parse((vendor.PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8"))
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and getattr(node.targets[0], "id", None) == "__version__"):
      return ast.literal_eval(node.value)
  raise ValueError(f"{vendor.PACKAGE_DIR / '__init__.py'} sets no __version__")


def source_file(*parts: str) -> pathlib.Path:
  """A file of the source checkout the export reads; `FileNotFoundError` naming it."""
  path = REPO.joinpath(*parts)
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} is missing: the export reads submissions/jit/, tuning_search_spaces/ "
        "and LICENSE from a source checkout of weight_averaging (pip install -e .)")
  return path


def summary(source: str) -> str:
  """The first line of a submission's docstring, without its API remark."""
  doc = ast.get_docstring(ast.parse(source)) or ""
  line = re.sub(r"\s*\(AlgoPerf \w+ API\)\.?\s*$", "", doc.strip().splitlines()[0]
                if doc.strip() else "")
  return line.rstrip(".") + "."


# ----------------------------------------------------------------------------
# submission.py


_LOADER = '''\
# The vendored package is imported relative to this folder. The scoring runner imports
# this file as a module of its folder's package
# (submissions_algorithms.submissions.<ruleset>.<name>.submission); a runner that loads
# it by path (importlib.util.spec_from_file_location) gives it no package, and then the
# folder is registered as one, under a name derived from its path, before the import.
import hashlib as _hashlib
import importlib as _importlib
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _entry_package():
  """The name of this folder's package, registering it first when loaded by path."""
  folder = _os.path.dirname(_os.path.realpath(__file__))
  parent = _sys.modules.get(__package__) if __package__ else None
  if folder in {_os.path.realpath(p) for p in getattr(parent, "__path__", ())}:
    return __package__
  name = "_weight_averaging_entry_" + _hashlib.sha256(folder.encode()).hexdigest()[:16]
  if name not in _sys.modules:
    spec = _importlib_util.spec_from_file_location(
        name, _os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    package = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = package
    spec.loader.exec_module(package)
  return name


_VENDORED = _entry_package() + ".{vendored}"
'''


def _replacement(node: ast.stmt, target: vendor.Module, where: str) -> List[str]:
  """The lines that bind what `node` (an import of the package) bound."""
  module = ".".join(target)
  prefix = '_VENDORED' + (f' + ".{module}"' if module else "")
  if isinstance(node, ast.Import):
    alias = node.names[0]
    if len(node.names) != 1 or not alias.asname or not target:
      raise ValueError(f"{where}: write 'from weight_averaging... import name' or "
                       "'import weight_averaging.x as y' in a submission")
    return [f"{alias.asname} = _importlib.import_module({prefix})"]
  out = []
  for alias in node.names:
    bound = alias.asname or alias.name
    if vendor.is_module(target + (alias.name,)):
      full = ".".join(target + (alias.name,))
      out.append(f'{bound} = _importlib.import_module(_VENDORED + ".{full}")')
    else:
      out.append(f"{bound} = _importlib.import_module({prefix}).{alias.name}")
  return out


def entry_submission(source: str, name: str, ruleset: str) -> str:
  """`source` (a jit submission) with its imports of the package made entry-relative.

  The imports must be at module level (`ValueError` otherwise); the loader goes where
  the first of them was, and the docstring's search-space path is the entry's own.
  """
  tree = ast.parse(source)
  lines = source.splitlines(keepends=True)
  nodes = [(n, t) for n, t, _ in vendor.package_imports(tree)]
  if not nodes:
    raise ValueError(f"submission {name!r} does not import weight_averaging")
  top = {id(n) for n in tree.body}
  edits = []
  for node, target in nodes:
    where = f"submissions/jit/{name}/submission.py:{node.lineno}"
    if id(node) not in top:
      raise ValueError(f"{where}: import weight_averaging at module level only")
    edits.append((node.lineno, node.end_lineno, _replacement(node, target, where)))
  edits.sort()
  first = edits[0][0]
  for start, end, new in reversed(edits):
    block = "\n".join(new) + "\n"
    if start == first:
      block = _LOADER.replace("{vendored}", VENDORED) + block
    lines[start - 1:end] = [block]
  text = "".join(lines)
  space = ("tuning_search_space.json" if ruleset == "external" else
           "none (self-tuning: the runner passes hyperparameters=None; see README.md)")
  return text.replace(f"tuning_search_spaces/{name}.json", space)


# ----------------------------------------------------------------------------
# The entry.


def _requirements() -> str:
  return ("# Nothing to install: this entry needs only " +
          ", ".join(vendor.ALLOWED_THIRD_PARTY) + " (pinned by AlgoPerf's JAX\n"
          "# environment) and the Python standard library. Its weight averaging code is\n"
          f"# vendored in {VENDORED}/.\n")


def entry_files(name: str, ruleset: str, authors: str = "", affiliations: str = ""
                ) -> Dict[str, bytes]:
  """``relative path -> bytes`` of the entry `name` under `ruleset`, sorted by path.

  `ValueError` names an unknown submission or ruleset and lists the choices, or an
  import on the vendored path that an AlgoPerf image may lack.
  """
  submission = catalog.get(name)
  if ruleset not in RULESETS:
    raise ValueError(f"unknown ruleset {ruleset!r}; choose from: {', '.join(RULESETS)}")
  source = source_file("submissions", "jit", name, "submission.py").read_text(
      encoding="utf-8")
  modules = vendor.closure(source, f"submissions/jit/{name}/submission.py")
  files: Dict[str, str] = {}
  for module in modules:
    path = vendor.module_file(module)
    rel = path.relative_to(vendor.PACKAGE_DIR).as_posix()
    files[f"{VENDORED}/{rel}"] = (
        f"# Vendored from weight_averaging {version()} ({vendor.PACKAGE}/{rel}) by\n"
        "# `python -m weight_averaging.export`, with its imports made relative.\n"
        + vendor.vendored_source(module))
  files["submission.py"] = entry_submission(source, name, ruleset)
  vendor.check_dependencies(files)
  space = None
  if ruleset == "external":
    space_path = source_file("tuning_search_spaces", f"{name}.json")
    files["tuning_search_space.json"] = space_path.read_text(encoding="utf-8")
    space = json.loads(files["tuning_search_space.json"])
  files["__init__.py"] = f'"""AlgoPerf entry {name!r} ({ruleset}): see README.md."""\n'
  files["requirements.txt"] = _requirements()
  files["README.md"] = readme.entry_readme(
      submission, ruleset, summary(source), space,
      sorted(f for f in files if f.startswith(VENDORED + "/")),
      folder=folder(name, ruleset), authors=authors, affiliations=affiliations,
      version=version())
  out = {k: v.encode("utf-8") for k, v in files.items()}
  out["LICENSE"] = source_file("LICENSE").read_bytes()
  return dict(sorted(out.items()))


def folder(name: str, ruleset: str) -> str:
  """The entry's folder in submissions_algorithms: ``submissions/<ruleset dir>/<name>``."""
  return f"submissions/{RULESET_FOLDERS[ruleset]}/{name}"


def rulesets(choice: str) -> Tuple[str, ...]:
  """``'external'``, ``'self_tuning'`` or ``'both'`` as a tuple of rulesets."""
  if choice == "both":
    return RULESETS
  if choice not in RULESETS:
    raise ValueError(f"unknown ruleset {choice!r}; choose from: "
                     f"{', '.join(RULESETS + ('both',))}")
  return (choice,)
