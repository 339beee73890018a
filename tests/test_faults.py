"""Faults a long run meets, with real processes, signals, locks and damaged files on disk.

User errors end launch.py with one `error:` line (exit 2, nothing created); an unreadable newest
checkpoint is set aside and resume falls back; SIGTERM saves the current step and exits 0; a
workdir lock refuses a second run; a bad training image names file, domain, stream and step
(or is skipped and counted); a NaN names step and term; and a soak test SIGKILLs a run at
random steps and resumes it to the uninterrupted run's parameters, bit for bit.
"""

import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import grain
import pytest

from helpers import (ROOT, TINY_RUN, assert_same_params, child_env as make_child_env,
                     error_lines, run_cli, tiny_demo_config)
from usss_jax import metric_writers, modes, train, workdir as workdir_lib
from usss_jax.data import pipeline
from usss_jax.domains import build_domains

_CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_demo_config

def get_config():
  return tiny_demo_config({data!r}, **{overrides!r})
"""


@pytest.fixture(scope="module")
def child_env():
  return make_child_env()


def _config_file(directory: pathlib.Path, data_root: str, **overrides) -> str:
  path = directory / "tiny_config.py"
  path.write_text(_CONFIG_FILE.format(tests=str(ROOT / "tests"), data=data_root,
                                      overrides={**TINY_RUN, **overrides}))
  return str(path)


def _launch(*args, env, timeout=240):
  return run_cli(*args, env=env, timeout=timeout)


def _start(config_file, workdir, log_path, env):
  return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), f"--config={config_file}",
                           f"--workdir={workdir}"], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))


def _wait_for_step(child, workdir: pathlib.Path, step: int, offset: int, log_path,
                   timeout: float = 240) -> None:
  """Until metrics.jsonl, past byte `offset`, logs a train step >= `step`."""
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline and child.poll() is None:
    if metrics.exists():
      records = metric_writers.read_records(str(metrics), offset)
      if any(r.get("kind") == "train" and r["step"] >= step for r in records):
        return
    time.sleep(0.05)
  child.kill()
  raise AssertionError(f"no step {step} logged; stderr:\n{open(log_path).read()[-3000:]}")


def _steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# 1. User errors.

def test_user_errors_are_one_line_exit_2_and_create_nothing(tmp_path, child_env):
  workdir = tmp_path / "new"
  # The demo config on the 8 test devices, its street data missing where a case says so.
  demo_flags = ["--config=configs/demo.py", "--config.batch_per_device=True",
                "--config.domains.street.generate_demo=False"]
  cases = {
      "--config.alhpa=2": "--config.alhpa: no such config key (did you mean 'alpha'?)",
      "--config.method=fancy": "config.method='fancy'",
      "--config.domains.street.root=" + str(tmp_path / "nowhere" / "street"):
          "domain 'street'",
  }
  for flag, expected in cases.items():
    out = _launch(*demo_flags, f"--workdir={workdir}", flag, env=child_env)
    lines = error_lines(out.stderr)
    assert out.returncode == 2, out.stderr[-2000:]
    assert lines[0].startswith("error: ") and expected in lines[0], out.stderr
    assert len(lines) <= 2 and "Traceback" not in out.stderr, out.stderr
    assert not workdir.exists(), f"{flag} left {list(workdir.iterdir())}"
  # The dataset root error names the config key and the environment variable.
  assert "--config.domains.street.root" in lines[1] and "$USSS_DATA_ROOT" in lines[1]
  # An empty workdir stays empty; --verbosity=1 adds the traceback.
  workdir.mkdir()
  out = _launch(*demo_flags, f"--workdir={workdir}", "--verbosity=1",
                "--config.domains.street.root=" + str(tmp_path / "nowhere" / "street"),
                env=child_env)
  assert out.returncode == 2 and "Traceback" in out.stderr
  assert any(line.startswith("error: domain 'street'") for line in error_lines(out.stderr))
  assert list(workdir.iterdir()) == []


# 2. Unreadable checkpoints.

def _truncate_data_files(step_dir: pathlib.Path) -> None:
  """Halves the array data files (metadata intact), as a full disk or a killed copy does."""
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garble_metadata(step_dir: pathlib.Path) -> None:
  """Overwrites the state's metadata files with bytes that are not JSON."""
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and "metadata" in path.name.lower():
      path.write_bytes(b"\x00garbage" * 8)


@pytest.mark.parametrize("damage", [_truncate_data_files, _garble_metadata])
def test_unreadable_newest_checkpoint_is_set_aside_and_resume_falls_back(
    tiny_run, demo_root, tmp_path, caplog, damage):
  reference_dir, reference = tiny_run.workdir, tiny_run.state
  workdir = tmp_path / "run"
  shutil.copytree(reference_dir, workdir)
  assert _steps(workdir / "checkpoints") == [10, 12]
  damage(workdir / "checkpoints" / "12")
  with caplog.at_level(logging.INFO, logger="usss_jax"):
    state, _, _ = modes.embed_and_train(tiny_demo_config(demo_root, **TINY_RUN), str(workdir))
  skipped = [r.getMessage() for r in caplog.records if "unreadable checkpoint" in r.getMessage()]
  assert len(skipped) == 1 and "\n" not in skipped[0], skipped
  assert f"{workdir}/checkpoints/12" in skipped[0] and "unreadable/12" in skipped[0]
  # One short line: the reason is cut to an excerpt (the run's own path length aside).
  assert len(skipped[0].replace(str(workdir), "RUN")) < 320, skipped[0]
  assert any("resumed from" in r.getMessage() and "step 10" in r.getMessage()
             for r in caplog.records)
  # The damaged checkpoint is kept aside; step 12 was trained again and saved in its place.
  assert (workdir / "checkpoints" / "unreadable" / "12" / "state").is_dir()
  assert _steps(workdir / "checkpoints") == [10, 12]
  assert_same_params(reference, state)


# 3. Stop signals (SIGTERM in a real process: the soak test at the end).

def test_first_sigint_requests_a_stop_and_handlers_are_restored(tmp_path):
  before = signal.getsignal(signal.SIGINT)
  with workdir_lib.RunGuard(str(tmp_path / "run")) as guard:
    assert workdir_lib.stop_requested() is None
    os.kill(os.getpid(), signal.SIGINT)
    assert workdir_lib.stop_requested() == "SIGINT" == guard.stop_signal
  assert signal.getsignal(signal.SIGINT) is before
  assert workdir_lib.stop_requested() is None


# 4. The workdir lock.

def test_workdir_in_use_is_refused_naming_the_pid(tmp_path, child_env):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / workdir_lib.LOCK_FILE
    lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
    out = _launch(f"--config={_config_file(tmp_path, '/unused')}", f"--workdir={workdir}",
                  env=child_env)
    lines = error_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert f"in use by process {holder.pid}" in lines[0]
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the holder's lock is untouched
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir / workdir_lib.LOCK_FILE
  lock.write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename}))
  with caplog.at_level(logging.WARNING, logger="usss_jax"):
    with workdir_lib.RunGuard(str(workdir)):
      assert json.loads(lock.read_text())["pid"] == os.getpid()
      with pytest.raises(workdir_lib.WorkdirInUseError, match="already active"):
        with workdir_lib.RunGuard(str(workdir)):
          pass
  assert any(f"stale lock {lock} of process {gone.pid}" in r.getMessage()
             for r in caplog.records)
  assert not lock.exists()


# 5. Bad images met mid-training.

def _unlabeled_image_first_met_at(config, workdir: str, name: str, step: int):
  """The unlabeled example of domain `name` that the stream first reaches at `step`."""
  domain = next(d for d in build_domains(config, workdir) if d.name == name)
  # The stream's own shuffle (pipeline.TrainInput._stream), rebuilt from its seed.
  shuffle_seed, _ = pipeline._stream_seeds(  # pylint: disable=protected-access
      config.seed, name, "unlabeled")
  order = grain.MapDataset.source(list(domain.unlabeled)).shuffle(seed=shuffle_seed).repeat(None)
  batch = config.unlabeled_batch
  seen = {order[i].key for i in range((step - 1) * batch)}
  return next(order[i] for i in range((step - 1) * batch, step * batch)
              if order[i].key not in seen)


@pytest.fixture
def damaged_data(demo_root, tmp_path):
  """A copy of the demo data whose street unlabeled image met first at step 5 is truncated."""
  root = tmp_path / "data"
  shutil.copytree(demo_root, root)
  config = tiny_demo_config(str(root), **TINY_RUN)
  splits_dir = tmp_path / "splits_probe"
  bad = _unlabeled_image_first_met_at(config, str(splits_dir), "street", 5)
  data = pathlib.Path(bad.image_path).read_bytes()
  pathlib.Path(bad.image_path).write_bytes(data[:len(data) // 3])
  return str(root), bad.image_path


def test_bad_image_fails_naming_it_then_skip_bad_images_resumes_counting_it(
    damaged_data, tmp_path, child_env, caplog):
  root, bad_path = damaged_data
  workdir = tmp_path / "run"
  out = _launch(f"--config={_config_file(tmp_path, root)}", f"--workdir={workdir}",
                env=child_env)
  lines = error_lines(out.stderr)
  errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
  assert out.returncode == 2 and errors, out.stderr[-3000:]
  first = lines[errors[0]]
  assert "training step 5" in first and "domain 'street', unlabeled stream" in first, first
  assert bad_path in first and "Traceback" not in out.stderr
  assert lines[errors[0] + 1:] and "skip_bad_images" in lines[errors[0] + 1]
  assert _steps(workdir / "checkpoints") == [2, 4]  # every checkpoint is kept
  # The same run with skip_bad_images resumes at step 4, replaces the image and counts it.
  config = tiny_demo_config(root, skip_bad_images=True, **TINY_RUN)
  with caplog.at_level(logging.WARNING, logger="usss_jax"):
    modes.embed_and_train(config, str(workdir))
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  skipped = {r["step"]: r["bad_images_skipped"] for r in records
             if r.get("kind") == "train" and "bad_images_skipped" in r}
  assert min(skipped) == 5 and skipped[5] == 1 and skipped[12] >= 1
  report = [r.getMessage() for r in caplog.records if "unloadable image" in r.getMessage()]
  assert report and f"street unlabeled {bad_path}" in report[0]
  assert f"skipped {skipped[12]} " in report[0]


# 6. Non-finite losses.

def test_nan_loss_names_step_and_term_and_keeps_the_last_good_checkpoint(demo_root, tmp_path):
  config = tiny_demo_config(demo_root, learning_rate=1e12, total_steps=4, checkpoint_every=1,
                            method="basic")
  with pytest.raises(metric_writers.NonFiniteLossError) as failure:
    train.run_training(config, str(tmp_path), build_domains(config, str(tmp_path)))
  error = failure.value
  assert error.name != "loss" and error.name.split("/")[0] in ("supervised", "cross", "within")
  steps = _steps(tmp_path / "checkpoints")
  assert steps and steps[-1] == error.step - 1
  assert f"at step {error.step}; the last good checkpoint, step {steps[-1]}, is kept" in str(error)


# The soak test (and SIGTERM).

def test_soak_kills_at_random_steps_and_resumes_to_identical_parameters(
    tiny_run, demo_root, tmp_path, child_env, caplog):
  """SIGKILL, SIGTERM, SIGKILL at random steps; the SIGTERM saves its step and exits 0."""
  reference = tiny_run.state
  seed = int(os.environ.get("USSS_SOAK_SEED", time.time_ns() % 10**6))
  # Up to step 9, so that the stop after a SIGTERM lands before the last step.
  kill_steps = sorted(random.Random(seed).sample(range(2, 10), 3))
  signals = (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)
  print(f"soak seed {seed}: signals after steps {kill_steps}")
  workdir, log_path = tmp_path / "run", tmp_path / "stderr.txt"
  config_file = _config_file(tmp_path, demo_root)
  metrics = workdir / "metrics.jsonl"
  for kill_step, sig in zip(kill_steps, signals):
    offset = metrics.stat().st_size if metrics.exists() else 0
    child = _start(config_file, workdir, log_path, child_env)
    _wait_for_step(child, workdir, kill_step, offset, log_path)
    child.send_signal(sig)
    returncode = child.wait(timeout=120)
    if sig == signal.SIGKILL:
      assert (workdir / workdir_lib.LOCK_FILE).exists()  # left behind: its pid is gone
      continue
    log = open(log_path).read()
    assert returncode == 0, log[-3000:]
    stopped = [line for line in log.splitlines() if "stopped by SIGTERM at step" in line]
    assert stopped, log[-3000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert kill_step <= step < 12 and step in _steps(workdir / "checkpoints")
    assert not (workdir / workdir_lib.LOCK_FILE).exists()
  with caplog.at_level(logging.WARNING, logger="usss_jax"):
    state, _, _ = modes.embed_and_train(tiny_demo_config(demo_root, **TINY_RUN), str(workdir))
  assert any("taking over the stale lock" in r.getMessage() for r in caplog.records)
  assert int(state["step"]) == 12
  assert_same_params(reference, state)
