"""The part of `weight_averaging` a submission needs, found from its imports, made relative.

`closure(source)` parses a submission's source and follows every import of the package,
module by module, to the files the submission executes: each imported module, each
submodule named in a ``from ... import``, and every parent package's ``__init__.py``
(importing ``a.b`` runs ``a/__init__.py`` first). Imports inside functions count too, so
an optional import cannot be missed. Nothing is imported: it reads the source.

`vendored_source(module)` is one module's source with each absolute import of the
package rewritten to the relative form (``from weight_averaging.optimizers import
common`` in ``algoperf_api/builder.py`` becomes ``from ..optimizers import common``), so
the copy works under any package name. `check_dependencies` refuses a module that
imports anything but jax, numpy, optax and the standard library.
"""

from __future__ import annotations

import ast
import collections
import pathlib
import re
import sys
from typing import Dict, Iterator, List, Sequence, Tuple

PACKAGE = "weight_averaging"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]
# What an entry may import besides the standard library: what AlgoPerf's JAX image pins.
ALLOWED_THIRD_PARTY = ("jax", "numpy", "optax")

Module = Tuple[str, ...]   # parts below the package: () is the package's own __init__


def module_file(module: Module) -> pathlib.Path:
  """The file of `module` (``a/b.py`` or ``a/b/__init__.py``); `ValueError` if none."""
  base = PACKAGE_DIR.joinpath(*module)
  if (base / "__init__.py").is_file():
    return base / "__init__.py"
  if module and base.with_suffix(".py").is_file():
    return base.with_suffix(".py")
  raise ValueError(f"{_dotted(module)} has no file under {PACKAGE_DIR}")


def is_module(module: Module) -> bool:
  try:
    module_file(module)
    return True
  except ValueError:
    return False


def _is_package(module: Module) -> bool:
  return (PACKAGE_DIR.joinpath(*module) / "__init__.py").is_file()


def _dotted(module: Module) -> str:
  return ".".join((PACKAGE,) + tuple(module))


def _byte_col(line: str, col: int) -> int:
  """`ast`'s column (UTF-8 bytes) as a character index into `line`."""
  return len(line.encode("utf-8")[:col].decode("utf-8"))


def package_imports(tree: ast.AST, module: Module = None
                    ) -> Iterator[Tuple[ast.stmt, Module, Tuple[str, ...]]]:
  """``(node, target, names)`` for each import of the package in `tree`.

  `target` is the module named after ``from`` (or after ``import``), `names` what a
  ``from`` imports from it. `module` is where `tree` lives in the package (``None``
  for a file outside it, whose relative imports are not the package's).
  """
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == PACKAGE:
          yield node, tuple(parts[1:]), ()
    elif isinstance(node, ast.ImportFrom):
      names = tuple(a.name for a in node.names)
      if node.level == 0 and node.module and node.module.split(".")[0] == PACKAGE:
        yield node, tuple(node.module.split(".")[1:]), names
      elif node.level and module is not None:
        package = module if _is_package(module) else module[:-1]
        if node.level - 1 > len(package):
          raise ValueError(f"{_dotted(module)}: relative import above the package")
        base = package[:len(package) - (node.level - 1)]
        yield node, base + (tuple(node.module.split(".")) if node.module else ()), names


def _imported_modules(tree: ast.AST, module: Module = None) -> Iterator[Module]:
  """The package's modules an import in `tree` executes, parents first."""
  for _, target, names in package_imports(tree, module):
    for i in range(len(target) + 1):
      yield target[:i]
    for name in names:   # `from pkg import submodule` imports the submodule
      if name != "*" and is_module(target + (name,)):
        yield target + (name,)


def closure(source: str, filename: str = "<submission>") -> List[Module]:
  """Every module of the package that running `source` imports, sorted.

  `ValueError` names an import of the package that has no file.
  """
  seen, queue = set(), collections.deque(_imported_modules(ast.parse(source, filename)))
  while queue:
    module = queue.popleft()
    if module in seen:
      continue
    path = module_file(module)   # raises, naming it, if it does not exist
    seen.add(module)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    queue.extend(_imported_modules(tree, module))
  return sorted(seen)


def relative_name(package: Module, target: Module) -> str:
  """``from X import`` for `target`, relative to a module in `package`:
  ``('algoperf_api',)`` to ``('optimizers',)`` is ``..optimizers``."""
  common = 0
  while (common < min(len(package), len(target))
         and package[common] == target[common]):
    common += 1
  return "." * (len(package) - common + 1) + ".".join(target[common:])


_FROM = re.compile(r"from\s+(\w+(?:\s*\.\s*\w+)*)\s+import\b")


def vendored_source(module: Module) -> str:
  """`module`'s source with its absolute imports of the package made relative.

  A multi-line ``from ... import (...)`` keeps its continuation lines aligned. An
  ``import weight_averaging.x`` has no relative form: `ValueError` naming the line.
  """
  path = module_file(module)
  source = path.read_text(encoding="utf-8")
  lines = source.splitlines(keepends=True)
  package = module if _is_package(module) else module[:-1]
  for node, target, _ in package_imports(ast.parse(source, str(path)), module):
    where = f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}"
    if isinstance(node, ast.Import):
      raise ValueError(f"{where}: 'import {PACKAGE}...' has no relative form; write "
                       f"'from {PACKAGE}... import name' instead")
    if node.level:
      continue   # already relative
    i = node.lineno - 1
    col = _byte_col(lines[i], node.col_offset)
    match = _FROM.match(lines[i], col)
    if match is None:
      raise ValueError(f"{where}: cannot find 'from {_dotted(target)} import' on one line")
    new = f"from {relative_name(package, target)} import"
    rest = lines[i][match.end():]
    lines[i] = lines[i][:col] + new + rest
    if rest.strip().startswith("(") and rest.strip() != "(":
      # Continuation lines aligned with the bracket move with it (a hanging
      # indent, after a bracket that ends the line, stays).
      shift = len(new) - (match.end() - col)
      for j in range(node.lineno, node.end_lineno):
        lines[j] = _shift(lines[j], shift)
  return "".join(lines)


def _shift(line: str, shift: int) -> str:
  if shift >= 0:
    return " " * shift + line if line.strip() else line
  indent = len(line) - len(line.lstrip(" "))
  return line[min(-shift, indent):]


def external_imports(tree: ast.AST) -> Iterator[Tuple[int, str]]:
  """``(line, top-level name)`` of every absolute import of another package in `tree`."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.lineno, node.module.split(".")[0]


def disallowed_imports(sources: Dict[str, str],
                       allowed: Sequence[str] = ALLOWED_THIRD_PARTY) -> List[str]:
  """``'file:line: name'`` for each import in `sources` (file -> source) of a module
  that is neither in `allowed`, nor the standard library, nor the package itself."""
  ok = set(allowed) | set(sys.stdlib_module_names) | {"__future__", PACKAGE}
  return [f"{name}:{line}: {top}" for name, source in sorted(sources.items())
          for line, top in sorted(external_imports(ast.parse(source, name)))
          if top not in ok]


def check_dependencies(sources: Dict[str, str]) -> None:
  """`ValueError` listing each import of something an AlgoPerf image may lack."""
  bad = disallowed_imports(sources)
  if bad:
    raise ValueError(
        "an exported entry may import only " + ", ".join(ALLOWED_THIRD_PARTY) +
        " and the standard library; these imports are on its path (make them lazy or "
        "move them out of the modules a submission imports):\n  " + "\n  ".join(bad))
