"""`python -m weight_averaging.export`: self-contained leaderboard entries.

The entries are exported into a temporary folder laid out as AlgoPerf's scoring mounts
submissions_algorithms, then driven in a fresh process where `weight_averaging` (and
orbax, matplotlib, tqdm) cannot be imported: a directory first on `sys.path` holds
packages of those names that raise `ImportError`. Each entry is loaded by path and as a
package and run through the stand-in runner loop of `fixtures/export_drive.py`; every
array it produces must equal, bit for bit, what the in-repo
``submissions/jit/<name>/submission.py`` produces in this process.
"""

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from weight_averaging.algoperf_api import catalog
from weight_averaging.export import (RULESET_FOLDERS, RULESETS, VENDORED, entry_files,
                                     export, vendor)
from weight_averaging.export.__main__ import main as export_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
BLOCKED = ("weight_averaging", "orbax", "matplotlib", "tqdm")
FORBIDDEN = ("orbax", "matplotlib", "tqdm", "absl")


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


drive_lib = _load(os.path.join(FIXTURES, "export_drive.py"), "export_drive")


def _tree(root):
  """``relative path -> bytes`` of every file under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for f in files:
      path = os.path.join(folder, f)
      out[os.path.relpath(path, root)] = open(path, "rb").read()
  return out


@pytest.fixture(scope="module")
def entries_root(tmp_path_factory):
  """A folder holding ``submissions_algorithms/submissions/...``: all six, both rulesets."""
  root = tmp_path_factory.mktemp("entries")
  export(str(root / "submissions_algorithms"), authors=["A. Author"],
         affiliations=["Somewhere"])
  return root


@pytest.fixture(scope="module")
def shadow(tmp_path_factory):
  """A sys.path entry whose `weight_averaging`, orbax, matplotlib and tqdm raise."""
  root = tmp_path_factory.mktemp("shadow")
  for name in BLOCKED:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(
        f"raise ImportError('{name} is not importable here: an exported entry must not "
        "need it')\n")
  return root


def _drive_exported(entries_root, shadow, ruleset, out_dir):
  env = dict(os.environ, PYTHONPATH=str(shadow), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run(
      [sys.executable, os.path.join(FIXTURES, "export_drive.py"), str(entries_root),
       ruleset, str(out_dir)] + list(catalog.NAMES),
      cwd=str(out_dir), env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-6000:]
  with open(out_dir / "report.json") as f:
    return json.load(f)


@pytest.mark.parametrize("ruleset", RULESETS)
def test_exported_entries_run_without_the_package_and_match_bit_for_bit(
    entries_root, shadow, tmp_path, ruleset):
  report = _drive_exported(entries_root, shadow, ruleset, tmp_path)
  assert report["devices"] == 4
  assert report["weight_averaging_modules"] == []
  assert report["blocked_modules"] == []
  folder = RULESET_FOLDERS[ruleset]
  for name in catalog.NAMES:
    in_repo = _load(os.path.join(REPO, "submissions", "jit", name, "submission.py"),
                    f"in_repo_{name}")
    want = drive_lib.drive(in_repo, drive_lib.hyperparameters(name, ruleset))
    for mode in ("path", "package"):
      # The vendored copy in this entry's folder ran, not some other one.
      assert os.path.realpath(report["files"][f"{mode}_{name}"]).startswith(
          os.path.realpath(entries_root / "submissions_algorithms" / "submissions" /
                           folder / name / VENDORED)), report["files"]
      got = np.load(tmp_path / f"{mode}_{name}.npz")
      assert len(got.files) == len(want), (name, mode)
      for i, w in enumerate(want):
        g = got[f"a{i:04d}"]
        assert g.dtype == w.dtype and g.shape == w.shape, (name, mode, i)
        np.testing.assert_array_equal(g, w, err_msg=f"{name} {mode} array {i}")


def test_entry_layout(entries_root):
  base = entries_root / "submissions_algorithms" / "submissions"
  assert sorted(os.listdir(base)) == sorted(RULESET_FOLDERS.values())
  for ruleset, folder in RULESET_FOLDERS.items():
    assert sorted(os.listdir(base / folder)) == sorted(catalog.NAMES)
    for name in catalog.NAMES:
      entry = base / folder / name
      top = {"__init__.py", "submission.py", "requirements.txt", "LICENSE", "README.md",
             VENDORED}
      if ruleset == "external":
        top.add("tuning_search_space.json")
        assert (entry / "tuning_search_space.json").read_bytes() == open(
            os.path.join(REPO, "tuning_search_spaces", f"{name}.json"), "rb").read()
      assert set(os.listdir(entry)) == top
      assert (entry / "LICENSE").read_bytes() == open(os.path.join(REPO, "LICENSE"),
                                                      "rb").read()
      # requirements.txt: comments only.
      assert all(not line.strip() or line.startswith("#")
                 for line in (entry / "requirements.txt").read_text().splitlines())
      readme = (entry / "README.md").read_text()
      yaml = readme.split("```yaml\n")[1].split("\n```")[0]
      # One `key: "value"` a line; a JSON string is a YAML double-quoted scalar.
      fields = {k: json.loads(v) for k, v in (ln.split(": ", 1) for ln in yaml.splitlines())}
      assert list(fields) == ["submission_name", "submission_folder", "authors",
                              "affiliations", "version", "ruleset", "framework",
                              "description"]
      assert fields["submission_folder"] == f"submissions/{folder}/{name}"
      assert fields["ruleset"] == {"external": "external", "self_tuning": "self-tuning"}[
          ruleset]
      assert fields["framework"] == "JAX"
      assert (fields["authors"], fields["affiliations"]) == ("A. Author", "Somewhere")
      assert all(isinstance(v, str) and v for v in fields.values()), fields
      assert "#" not in yaml   # the leaderboard's PR check cuts lines at '#'
      source = (entry / "submission.py").read_text()
      assert "weight_averaging import" not in source
      assert "tuning_search_spaces/" not in source


def test_self_tuning_readme_states_the_code_point(entries_root):
  """The self-tuning README lists, value by value, the code's SELF_TUNING_* points of
  its optimizer, of averaging and of its averager, and no other optimizer's or
  averager's."""
  from weight_averaging.algoperf_api import hyperparameters as hp
  for name in catalog.NAMES:
    readme = (entries_root / "submissions_algorithms" / "submissions" / "self_tuning" /
              name / "README.md").read_text()
    sub = catalog.get(name)
    mine = [sub.optimizer] + (["averaging", sub.averager] if sub.averager else [])
    others = [t for t in catalog.OPTIMIZERS + catalog.AVERAGERS + ("averaging",)
              if t not in mine]
    assert hasattr(hp, f"SELF_TUNING_{sub.optimizer.upper()}")
    for topic in mine:
      point = getattr(hp, f"SELF_TUNING_{topic.upper()}", {})
      for key, value in point.items():
        assert f"| `{key}` | `{json.dumps(value)}` |" in readme, (name, key)
    for topic in others:
      assert f"SELF_TUNING_{topic.upper()}`" not in readme, (name, topic)


def test_vendored_tree_imports_only_jax_numpy_optax_and_the_standard_library(
    entries_root):
  base = entries_root / "submissions_algorithms" / "submissions"
  stdlib = set(sys.stdlib_module_names) | {"__future__"}
  for folder in RULESET_FOLDERS.values():
    for name in catalog.NAMES:
      entry = base / folder / name
      for rel, data in _tree(entry).items():
        if not rel.endswith(".py"):
          continue
        tree = ast.parse(data.decode(), rel)
        for node in ast.walk(tree):
          if isinstance(node, ast.ImportFrom) and node.level:
            continue
          if isinstance(node, (ast.Import, ast.ImportFrom)):
            tops = ([a.name.split(".")[0] for a in node.names]
                    if isinstance(node, ast.Import) else [node.module.split(".")[0]])
            for top in tops:
              assert top not in FORBIDDEN and top != "weight_averaging", (rel, top)
              assert top in stdlib or top in ("jax", "numpy", "optax"), (name, rel, top)


def _absolute(tree, package):
  """`tree` with each relative import made absolute, from a module in `package`."""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level:
      base = list(package[:len(package) - (node.level - 1)])
      node.module = ".".join(["weight_averaging"] + base + (
          node.module.split(".") if node.module else []))
      node.level = 0
  return tree


def test_vendored_files_are_the_package_with_relative_imports():
  """Each vendored module is the package's own, statement for statement, once its
  relative imports are resolved: the export leaves no stale second copy."""
  files = {k[len(VENDORED) + 1:]: v for k, v in
           entry_files("shampoo_lawa", "external").items() if k.startswith(VENDORED + "/")}
  assert {"__init__.py", "averagers.py", "placement.py", "validation.py", "snapshots.py",
          "algoperf_api/builder.py", "optimizers/shampoo/transform.py"} <= set(files)
  for rel, data in files.items():
    package = tuple(os.path.dirname(rel).split("/")) if os.path.dirname(rel) else ()
    copy = _absolute(ast.parse(data.decode()), package)
    original = ast.parse((vendor.PACKAGE_DIR / rel).read_text())
    assert ast.dump(copy) == ast.dump(original), rel
    assert not [ln for ln in data.decode().splitlines()
                if ln.lstrip().startswith(("from weight_averaging", "import weight_averaging"))]


def test_relative_name():
  assert vendor.relative_name(("algoperf_api",), ("optimizers",)) == "..optimizers"
  assert vendor.relative_name(("algoperf_api",), ("algoperf_api",)) == "."
  assert vendor.relative_name(("algoperf_api",), ()) == ".."
  assert vendor.relative_name((), ("optimizers", "shampoo")) == ".optimizers.shampoo"
  assert vendor.relative_name(("optimizers", "shampoo"), ("optimizers",)) == ".."


def test_disallowed_imports_are_named():
  bad = vendor.disallowed_imports({"m.py": "import os\nimport jax.numpy\n"
                                           "def f():\n  from orbax import checkpoint\n"
                                           "from tqdm import tqdm\n"})
  assert bad == ["m.py:4: orbax", "m.py:5: tqdm"]
  with pytest.raises(ValueError, match="orbax"):
    vendor.check_dependencies({"m.py": "import orbax.checkpoint\n"})


def test_export_twice_gives_identical_files(tmp_path):
  export(str(tmp_path / "a"), ["nadamw_ema", "shampoo"])
  export(str(tmp_path / "b"), ["nadamw_ema", "shampoo"])
  a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
  assert sorted(a) == sorted(b) and a == b
  assert len(a) > 4 * 10


def test_unknown_submission_or_ruleset_is_named_with_the_choices(tmp_path, capsys):
  with pytest.raises(ValueError, match=r"'adam'.*nadamw, nadamw_ema"):
    export(str(tmp_path / "x"), ["adam"])
  with pytest.raises(ValueError, match=r"'selftuning'.*external, self_tuning, both"):
    export(str(tmp_path / "x"), ruleset="selftuning")
  assert not (tmp_path / "x").exists()   # nothing written
  assert export_main(["--output_dir", str(tmp_path / "y"), "--ruleset", "nope"]) == 2
  assert "'nope'" in capsys.readouterr().err
  assert export_main(["--output_dir", str(tmp_path / "y"), "--submissions", "sgd"]) == 2
  err = capsys.readouterr().err
  assert "'sgd'" in err and "shampoo_lawa" in err


def test_existing_output_dir_needs_overwrite_and_only_entries_are_replaced(tmp_path,
                                                                           capsys):
  out = tmp_path / "out"
  export(str(out), ["nadamw"], "external")
  entry = out / "submissions" / "external_tuning" / "nadamw"
  (entry / "stale.py").write_text("old\n")
  (out / "keep.txt").write_text("mine\n")
  with pytest.raises(FileExistsError, match="--overwrite"):
    export(str(out), ["nadamw"], "external")
  assert export_main(["--output_dir", str(out), "--submissions", "nadamw",
                      "--ruleset", "external"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert export_main(["--output_dir", str(out), "--submissions", "nadamw",
                      "--ruleset", "external", "--overwrite", "--authors", "A",
                      "--affiliations", "B"]) == 0
  assert not (entry / "stale.py").exists()
  assert (out / "keep.txt").read_text() == "mine\n"
  assert (entry / "submission.py").exists()


def test_a_hash_in_the_yaml_is_refused(tmp_path):
  with pytest.raises(ValueError, match="authors.*'#'"):
    export(str(tmp_path / "x"), ["nadamw"], authors=["Team #1"])


# ----------------------------------------------------------------------------
# With AlgoPerf installed: its own fake-data harness on the exported entries.

ALGOPERF = importlib.util.find_spec("algoperf")
ALGOPERF_ROOT = (os.path.dirname(os.path.dirname(ALGOPERF.origin)) if ALGOPERF and
                 ALGOPERF.origin else None)
HARNESS = ALGOPERF_ROOT and os.path.join(ALGOPERF_ROOT, "tests",
                                         "reference_algorithm_tests.py")


@pytest.mark.skipif(not HARNESS or not os.path.exists(HARNESS),
                    reason="needs algoperf installed from a checkout (its "
                           "tests/reference_algorithm_tests.py)")
@pytest.mark.parametrize("ruleset", RULESETS)
def test_algoperf_harness_passes_on_exported_entries(entries_root, tmp_path_factory,
                                                      tmp_path, ruleset):
  # Only `weight_averaging` is shadowed here: AlgoPerf itself uses orbax, tqdm and absl.
  shadow = tmp_path_factory.mktemp("shadow_wa")
  (shadow / "weight_averaging").mkdir()
  (shadow / "weight_averaging" / "__init__.py").write_text(
      "raise ImportError('weight_averaging is not importable here')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", WA_N_DEVICES="4",
             TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([str(shadow), str(entries_root), ALGOPERF_ROOT]))
  out = tmp_path / "harness.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(FIXTURES, "export_harness.py"), str(entries_root),
       ruleset, str(out)] + list(catalog.NAMES),
      cwd=ALGOPERF_ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
  results = json.loads(out.read_text())
  assert results.pop("_weight_averaging_modules") == []
  assert sorted(results) == sorted(catalog.NAMES)
  for name, result in results.items():
    assert result["missing"] == [], (name, result)
    assert f"/{RULESET_FOLDERS[ruleset]}/{name}/{VENDORED}/" in result["vendored"]
    if ruleset != "self_tuning":
      continue
    # The runner's self-tuning ruleset: every call got hyperparameters=None, the first
    # and the last step were evaluated through prepare_for_eval, and training went on.
    calls, evals = result["runner"]["calls"], result["runner"]["evals"]
    steps = [s for fn, s, _ in calls if fn == "update_params"]
    prepares = [s for fn, s, _ in calls if fn == "prepare_for_eval"]
    assert all(is_none for _, _, is_none in calls), calls
    assert steps == list(range(len(steps))) and len(steps) >= 10, calls
    assert prepares[0] == 1 and prepares[-1] == len(steps), calls
    assert [int(e["global_step"]) for e in evals] == prepares, (calls, evals)
    assert all(math.isfinite(v) for e in evals for v in e.values()), evals
