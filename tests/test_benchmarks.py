"""The benchmark scripts' wiring: train_step.py's shape presets, the methods table, the step
profile (benchmarks/profile_step.py), and the GPU
check (benchmarks/gpu_check.py): how it records items that fail, and its CPU dry run, which
runs every item with tiny shapes (the check itself needs a GPU)."""

import json
import math
import subprocess
import sys

import pytest

import helpers
from usss_jax import cli
from usss_jax import config as config_lib

sys.path.insert(0, str(helpers.ROOT))
from benchmarks import gpu_check, methods, train_step  # noqa: E402


def test_shape_presets_take_the_experiment_configs_and_explicit_flags_win():
  config = config_lib.load_config("camvid_iddlite")
  args = train_step.parse_args(["--shapes", "camvid_iddlite"])
  assert (args.encoder, args.encoder_channels, args.embedding_dim) == (
      config.encoder, tuple(config.encoder_channels), config.embedding_dim)
  assert (args.classes, args.labeled, args.unlabeled, args.height, args.width) == (
      (11, 7), 4, 4, 96, 128)
  args = train_step.parse_args(["--shapes=camvid_iddlite", "--labeled", "16", "--height=64"])
  assert (args.labeled, args.unlabeled, args.height, args.width) == (16, 4, 64, 128)
  paper = train_step.parse_args(["--shapes", "cs_idd"])
  assert (paper.classes, paper.labeled, paper.unlabeled, paper.height, paper.width,
          paper.embedding_dim, paper.encoder_channels) == ((19, 26), 10, 10, 512, 512, 128, ())
  defaults = train_step.parse_args([])
  assert (defaults.shapes, defaults.classes, defaults.labeled, defaults.height,
          defaults.width) == ("defaults", (19, 26), 2, 256, 512)


def test_methods_table_marks_failed_rows():
  text = methods.markdown([methods.row({"method": "basic", "shapes": "defaults", "error": "x"})])
  assert text.splitlines()[2].startswith("| defaults | basic | error |")


def test_gpu_check_records_items_that_fail_and_goes_on(tmp_path, monkeypatch, capsys):
  env = helpers.child_env()
  failed = gpu_check.run_item([sys.executable, "-c", "import sys; sys.exit('boom')"], 60, env)
  assert not failed["ok"] and failed["returncode"] == 1 and "boom" in failed["error"]
  missing = gpu_check.run_item([str(tmp_path / "no_python"), "-c", "pass"], 60, env)
  assert not missing["ok"] and "no_python" in missing["error"]
  item = {"ok": True}
  gpu_check.add_result(item, str(tmp_path / "none.json"), gpu_check.read_json)
  assert not item["ok"] and item["error"].startswith("no usable result")

  # No time left: every item is recorded as not run, the outputs are still written.
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as stop:
    gpu_check.main(["--dry-run", "--budget-s", "0", "--out", str(out)])
  assert stop.value.code == 1 and "failed: train_step defaults float32" in capsys.readouterr().err
  result = json.loads((out / "gpu_check.json").read_text())
  assert len(result["items"]) == 2 * len(gpu_check.SHAPES) * len(gpu_check.DTYPES) + 1
  assert all(not it["ok"] and it["error"] for it in result["items"])
  table = (out / "gpu_check.md").read_text()
  assert "| usss-jax | cs_idd | bfloat16 | not run: the time budget is spent |" in table
  assert "Demo training failed: not run" in table

  monkeypatch.setattr(gpu_check, "MIN_ITEM_S", 0.0)
  late = gpu_check.run_item([sys.executable, "-c", "import time; time.sleep(30)"], 1, env)
  assert not late["ok"] and late["error"] == "timed out after 1 s"


def _positive(value) -> bool:
  return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_item(tmp_path):
  out = tmp_path / "out"
  # Limits far above the check's own: a loaded 2-core machine takes minutes for the tiny run.
  proc = subprocess.run([str(helpers.ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                         "--out", str(out), "--budget-s", "1500", "--item-limit-s", "600",
                         "--demo-limit-s", "600"], capture_output=True, text=True,
                        env=helpers.child_env(PYTHON=sys.executable), timeout=1800, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((out / "gpu_check.json").read_text())
  assert result["dry_run"] and result["versions"]["jax"] and result["versions"]["backend"] == "cpu"
  items = {(it["kind"], it.get("shape"), it.get("dtype")): it for it in result["items"]}
  assert set(items) == {("demo", None, None)} | {
      (kind, shape, dtype) for kind in ("train_step", "torch_step")
      for shape in gpu_check.SHAPES for dtype in gpu_check.DTYPES}
  for (kind, _, dtype), it in items.items():
    if kind == "train_step":
      assert it["ok"] and it["setup"]["dtype"] == dtype, it
      assert all(_positive(it[k]) for k in ("seconds_per_step", "images_per_s",
                                            "gflop_per_step", "mfu_matmul")), it
    elif kind == "torch_step":  # measured where this Python has torch, else skipped
      assert (it["ok"] and _positive(it["seconds_per_step"])) or (
          it.get("skipped") and it["error"].startswith("skipped: ")), it
  demo = items["demo", None, None]
  assert demo["ok"] and 0.0 <= demo["mean_miou"] <= 1.0, demo
  assert set(demo["miou"]) == {"street", "indoor"}
  table = (out / "gpu_check.md").read_text()
  assert "| usss-jax | cs_idd | bfloat16 |" in table and "Demo training" in table


@pytest.mark.slow
def test_the_profile_attributes_the_tiny_step_to_its_stages_and_kinds(tmp_path):
  """As a user runs it: its own process, one CPU device, the entry points' XLA options."""
  out = tmp_path / "profile.json"
  proc = subprocess.run(
      [sys.executable, str(helpers.ROOT / "benchmarks" / "profile_step.py"), "--tiny",
       "--trace-steps", "1", "--top", "5", "--json-out", str(out)],
      capture_output=True, text=True, env=helpers.child_env(XLA_FLAGS=""), timeout=900,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["setup"]["xla_flags"] == " ".join(cli.DEFAULT_XLA_FLAGS)
  shares = result["shares"]
  assert result["thunk_seconds_per_step"] > 0 and len(result["top_ops"]) == 5
  for key in ("stage", "kind", "stage_direction"):
    assert math.isclose(sum(v["share"] for v in shares[key].values()), 1.0, rel_tol=1e-6), key
  # Every encoder stage runs forward and backward; the convolutions are told apart.
  assert {f"encoder/layer{i} {d}" for i in range(9) for d in ("forward", "backward")} <= set(
      shares["stage_direction"])
  assert {"conv forward", "conv input grad", "conv kernel grad"} <= set(shares["kind"])
  assert {"heads", "entropy module", "rest"} <= set(shares["stage"])
  assert "encoder/layer6 backward" in proc.stdout
