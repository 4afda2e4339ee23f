"""Self-contained AlgoPerf leaderboard entries: ``python -m weight_averaging.export``.

For each submission and ruleset, `export` writes
``DIR/submissions/{external_tuning,self_tuning}/<name>/`` in the layout of
mlcommons/submissions_algorithms: ``__init__.py``, ``submission.py`` (the jit API), the
modules of this package the submission imports, vendored in
``weight_averaging_vendored/`` with relative imports (only jax, numpy, optax and the
standard library), ``tuning_search_space.json`` (external tuning only),
``requirements.txt``, ``LICENSE`` and a ``README.md`` with the PR's YAML block.

Everything is generated from the package and the checkout's ``submissions/jit/``,
``tuning_search_spaces/`` and ``LICENSE`` at export time; the same sources give the
same bytes.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import List, Optional, Sequence

from weight_averaging.algoperf_api import catalog
from weight_averaging.export.entry import (RULESET_FOLDERS, RULESETS, VENDORED, entry_files,
                                           folder, rulesets)

__all__ = ["export", "entry_files", "folder", "rulesets", "RULESETS", "RULESET_FOLDERS",
           "VENDORED"]


def export(output_dir: str, submissions: Optional[Sequence[str]] = None,
           ruleset: str = "both", authors: Sequence[str] = (),
           affiliations: Sequence[str] = (), overwrite: bool = False
           ) -> List[pathlib.Path]:
  """Writes the entries; returns their folders.

  Args:
    output_dir: where ``submissions/`` goes (e.g. a clone of submissions_algorithms).
      A directory that exists and is not empty is refused unless `overwrite`; then only
      the entry folders written here are replaced, nothing else in it is touched.
    submissions: names from `catalog.NAMES` (default: all of them).
    ruleset: ``'external'``, ``'self_tuning'`` or ``'both'``.
    authors, affiliations: for the PR's YAML block, joined with ", ".
    overwrite: see `output_dir`.
  """
  names = list(catalog.NAMES if not submissions else submissions)
  for name in names:
    catalog.get(name)   # unknown: ValueError listing the known ones
  chosen = rulesets(ruleset)
  root = pathlib.Path(output_dir)
  if root.exists() and not root.is_dir():
    raise FileExistsError(f"output dir {root} is a file; pick a directory")
  if root.exists() and any(root.iterdir()) and not overwrite:
    raise FileExistsError(
        f"output dir {root} exists and is not empty; pass --overwrite to replace the "
        "entries it would write (nothing else in it is touched), or pick a new dir")
  # Build every entry before writing any, so that a bad input writes nothing.
  entries = {(name, r): entry_files(name, r, ", ".join(authors), ", ".join(affiliations))
             for r in chosen for name in names}
  written = []
  for (name, r), files in entries.items():
    target = root / folder(name, r)
    if target.exists():
      shutil.rmtree(target)
    for rel, data in files.items():
      path = target / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
    written.append(target)
  return written
