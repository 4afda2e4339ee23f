"""The house's rules: imports run one way, rooms stay small.

Read from the source (nothing is imported), so a violation is named with its file and line:

* the library core (`averagers`, `placement`, `validation`) imports nothing of the package but
  itself; `snapshots`, `layout` and `processes` nothing at all;
* `optimizers` imports nothing of the package outside `optimizers`;
* the AlgoPerf glue (`algoperf_api`) only the core, `snapshots` and `optimizers`;
* the embedded workloads only the core;
* nothing below the glue imports it, and the library (everything but `runner`, `studies` and
  the demo) never imports the runner, the studies or the demo;
* the runner does not import the studies or the demo; the studies not the demo;
* the rehearsal (a consumer, like the studies) not the runner or the demo.
"""

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "weight_averaging"

CORE = {"averagers", "placement", "validation"}
# room -> the rooms it may import (its own room is always allowed).
ALLOWED = {
    "core": {"core"},
    "snapshots": set(),
    "layout": set(),
    "processes": set(),   # child process groups and directory locks (command lines)
    "optimizers": set(),
    "algoperf_api": {"core", "snapshots", "optimizers"},
    "export": {"core", "snapshots", "optimizers", "algoperf_api"},
    "workloads": {"core"},
    "runner": {"core", "snapshots", "layout", "processes", "optimizers", "algoperf_api",
               "workloads"},
    "studies": {"core", "snapshots", "layout", "processes", "optimizers", "algoperf_api",
                "workloads"},
    "demo": {"core", "snapshots", "layout", "processes", "optimizers", "algoperf_api", "workloads",
             "runner", "studies"},
    # the CPU rehearsal through the official runner: a consumer beside the runner and studies
    "rehearsal": {"core", "snapshots", "layout", "processes", "optimizers", "algoperf_api",
                  "workloads", "studies"},
    "package": {"core"},   # weight_averaging/__init__.py: the library's front door
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _room(parts):
  """The room of module `weight_averaging.<parts...>` (parts without the package name)."""
  if not parts or parts == ["__init__"]:
    return "package"
  head = parts[0]
  if head in CORE:
    return "core"
  if head == "__main__":
    return "demo"
  return head


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    yield path, parts


def _imported(path, parts):
  """(line, [parts of the imported weight_averaging module]) for every import in `path`."""
  tree = ast.parse(path.read_text(), str(path))
  package = parts[:-1]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "weight_averaging":
          yield node.lineno, alias.name.split(".")[1:]
    elif isinstance(node, ast.ImportFrom):
      if node.level:   # relative: resolve against this module's package
        base = package[:len(package) - (node.level - 1)]
        if not node.module:
          for alias in node.names:
            yield node.lineno, base + [alias.name]
          continue
        target = base + node.module.split(".")
      elif node.module and node.module.split(".")[0] == "weight_averaging":
        target = node.module.split(".")[1:]
      else:
        continue
      if target:
        yield node.lineno, target
      else:   # `from weight_averaging import placement, averagers`
        for alias in node.names:
          yield node.lineno, [alias.name]


def test_imports_run_one_way():
  violations = []
  for path, parts in _modules():
    room = _room(parts)
    allowed = ALLOWED.get(room)
    if allowed is None:
      violations.append(f"{path.relative_to(ROOT)}: room {room!r} has no rule in this test")
      continue
    for line, target in _imported(path, parts):
      target_room = _room(target)
      if target_room != room and target_room not in allowed:
        violations.append(f"{path.relative_to(ROOT)}:{line}: {room} imports "
                          f"weight_averaging.{'.'.join(target)} ({target_room})")
  assert not violations, "imports against the house's direction:\n" + "\n".join(violations)


def test_a_violation_is_caught(tmp_path):
  """The checker itself: a core module importing the runner is named."""
  path = tmp_path / "averagers.py"
  path.write_text("from weight_averaging.runner import trial\nimport weight_averaging.studies\n")
  found = [(_room(t), line) for line, t in _imported(path, ["averagers"])]
  assert found == [("runner", 1), ("studies", 2)]
  assert not {"runner", "studies"} & ALLOWED["core"]


@pytest.mark.parametrize("path", [p for p, _ in _modules()], ids=lambda p: str(p.relative_to(ROOT)))
def test_rooms_stay_small(path):
  source = path.read_text()
  lines = source.count("\n")
  assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"
  long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
          for n in ast.walk(ast.parse(source))
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
          and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_room_has_a_rule():
  rooms = {_room(parts) for _, parts in _modules()}
  assert rooms <= set(ALLOWED), f"rooms without a rule: {sorted(rooms - set(ALLOWED))}"
  assert os.path.isdir(PACKAGE)
