"""What the tests share: tiny configs (CPU-sized: seconds per run, 8 fake devices), paths,
the command-line runner, and numeric helpers."""

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from usss_jax import config as config_lib
from usss_jax import metric_writers, objectives, sharding, train_step
from usss_jax import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# DRN-D-22 layout with tiny widths: wiring tests, not accuracy.
TINY = (4, 8, 12, 16, 20, 24, 28, 32)
# The shared tiny run (conftest `tiny_run`): checkpoints every 2 steps (newest two kept), one
# evaluation at the end.
TINY_RUN = dict(total_steps=12, eval_every=12)


def set_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Applies {"a.b": value} overrides (dotted keys reach nested entries)."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def tiny_demo_config(data_root: str, **overrides) -> ml_collections.ConfigDict:
  """A few-second universal run on (a small copy of) the demo data."""
  c = config_lib.base_config()
  c.domain_names = ("street", "indoor")
  for name in c.domain_names:
    c.domains[name] = config_lib.domain("folder", os.path.join(data_root, name), crop=(32, 48),
                                        generate_demo=True)
  c.method = "full"
  c.num_labeled = 4
  c.encoder_channels = TINY
  c.embedding_dim = 8
  c.learning_rate = 0.05
  c.labeled_batch = 8
  c.unlabeled_batch = 8
  c.eval_batch = 8
  c.total_steps = 8
  c.checkpoint_every = 2
  c.eval_every = 8
  c.log_every = 1
  c.eval_max_examples = 8
  c.label_embeddings.source = "random"
  return set_overrides(c, overrides)


def tiny_synthetic_config(names, crop_hw, method: str = "full",
                          **overrides) -> ml_collections.ConfigDict:
  """Domains without data on disk (train-step tests feed their own batches)."""
  c = config_lib.base_config()
  c.method = method
  c.domain_names = tuple(names)
  for n in names:
    c.domains[n] = config_lib.domain("folder", "/nonexistent", crop=crop_hw)
  c.encoder_channels = TINY
  c.embedding_dim = 6
  c.learning_rate = 0.05
  c.total_steps = 10
  c.labeled_batch = 8
  c.unlabeled_batch = 8
  c.eval_batch = 8
  return set_overrides(c, overrides)


def demo_overrides(data_root: str) -> list[str]:
  """launch.py flags that turn configs/demo.py into the tiny demo run on `data_root`."""
  return [f"--config.domains.street.root={data_root}/street",
          f"--config.domains.indoor.root={data_root}/indoor",
          f"--config.encoder_channels={TINY}", "--config.embedding_dim=8",
          "--config.domains.street.crop=(32, 48)", "--config.domains.indoor.crop=(32, 48)",
          "--config.num_labeled=4", "--config.eval_max_examples=8"]


def child_env(**extra) -> dict:
  """Environment of a child process: this session's compilation cache and 8 CPU devices."""
  return dict(os.environ, PYTHONUNBUFFERED="1",
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """`<common temp>/<name>`, made by `build(path)` in exactly one worker of this test run (the
  others wait for it and reuse it)."""
  common = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_TESTRUNUID"):  # every worker's basetemp is in the run's one
    common = common.parent
  path = common / name
  with open(common / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (path / ".done").exists():
      path.mkdir(parents=True, exist_ok=True)
      build(path)
      (path / ".done").touch()
  return path


def run_cli(*args, module: str | None = None, env: dict | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess:
  """Runs `launch.py ARGS` (or `python -m MODULE ARGS`) from the repository root."""
  command = ([sys.executable, "-m", module] if module else
             [sys.executable, str(ROOT / "launch.py")])
  return subprocess.run([*command, *map(str, args)], cwd=ROOT, env=env or child_env(),
                        capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  """The non-empty lines of a CLI's stderr."""
  return [line for line in stderr.splitlines() if line.strip()]


def rel_err(got, ref) -> float:
  """max |got - ref| / max |ref|, in float64."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))


def host_params(state: dict):
  """(params, batch_stats, opt_state) of a train state as NumPy arrays."""
  return jax.tree.map(np.asarray, (state["params"], state["batch_stats"], state["opt_state"]))


def assert_same_params(state_a: dict, state_b: dict) -> None:
  """Bit-identical parameters, BN statistics and optimiser state."""
  jax.tree.map(np.testing.assert_array_equal, host_params(state_a), host_params(state_b))


def final_state_and_results(config: ml_collections.ConfigDict, workdir) -> tuple[dict, dict]:
  """A finished run's latest checkpoint and its last evaluation (from metrics.jsonl)."""
  spaces = json.loads((pathlib.Path(workdir) / "label_spaces.json").read_text())["domains"]
  _, state, _ = state_lib.restore(config, str(workdir), [len(s["classes"]) for s in spaces],
                                  tuple(spaces[0]["crop_hw"]), which="latest")
  evals = [r for r in metric_writers.read_records(os.path.join(workdir, "metrics.jsonl"))
           if r.get("kind") == "eval"]
  results = {k: v for k, v in evals[-1].items() if k not in ("step", "kind")} if evals else {}
  return state, results


def build_train_step(config: ml_collections.ConfigDict, num_classes, input_hw, embeddings=None,
                     seed: int | None = None):
  """(model, spec, state at step 0 on the first device, the unjitted step) of a config.

  embeddings: per domain [C, D] label embeddings (default: N(0, 1) rows, seed 42).
  """
  if seed is not None:
    config.seed = seed
  if embeddings is None:
    rng = np.random.default_rng(42)
    embeddings = [rng.normal(size=(c, config.embedding_dim)).astype(np.float32)
                  for c in num_classes]
  spec = objectives.method_spec(config)
  model = state_lib.make_model(config, num_classes)
  tx, _ = state_lib.make_optimizer(config)
  state = state_lib.initial_state(config, model, tx, spec, input_hw, embeddings,
                                  sharding.replicated(sharding.single_device_mesh()))
  return model, spec, state, train_step.make_train_step(model, tx, spec, config.domain_names)


@contextlib.contextmanager
def tmpfs_disk(path: pathlib.Path, size: str):
  """A real small disk: a tmpfs of `size` (e.g. "1m") mounted at `path` (made here) for the
  block; skips the test where mounting is not allowed (needs root)."""
  path.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def logs_warning(match: str | None = None):
  """Asserts that the block logs a warning on the usss_jax logger (matching `match`)."""
  records: list[logging.LogRecord] = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger("usss_jax")
  logger.addHandler(handler)
  try:
    yield records
  finally:
    logger.removeHandler(handler)
  messages = [r.getMessage() for r in records]
  assert messages, "no warning was logged"
  assert match is None or any(re.search(match, m) for m in messages), messages


def synthetic_batch(names, classes, hw, seed: int = 0, b: int = 8) -> dict:
  """A random train-step batch: per domain labeled images and labels (first two rows ignore),
  unlabeled weak and strong views, a CutMix box and a valid mask (last three rows padding)."""
  rng = np.random.default_rng(seed)
  out = {}
  for n, c in zip(names, classes):
    label = rng.integers(0, c, (b, *hw)).astype(np.int32)
    label[:, :2] = 255
    box = np.zeros((b, *hw), bool)
    box[:, 4:10, 2:12] = True
    valid = np.ones((b, *hw), bool)
    valid[:, -3:] = False
    out[n] = {"labeled": {"image": rng.normal(size=(b, *hw, 3)).astype(np.float32),
                          "label": label},
              "unlabeled": {"image": rng.normal(size=(b, *hw, 3)).astype(np.float32),
                            "strong": rng.normal(size=(b, *hw, 3)).astype(np.float32),
                            "cutmix_mask": box, "valid": valid}}
  return out
