"""Several processes on one shared workdir: two launch.py processes joined by jax.distributed on
localhost (2 CPU devices each, the same --workdir), as hosts sharing a filesystem are.

Only process 0 writes the shared files (splits, config, label spaces, label embeddings,
metrics) while the other waits; ten fresh starts in a row all succeed and agree bit for bit; a
SIGTERM to one process stops both at the same step with one checkpoint, and the resume ends
where an uninterrupted run does; a SIGKILL of either process makes the other stop within the
heartbeat timeout with one `error:` line naming the lost process (never a hang).
"""

import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import (ROOT, assert_same_params, built_once, child_env, error_lines,
                     tiny_demo_config)
from usss_jax import metric_writers
from usss_jax import state as state_lib

pytestmark = pytest.mark.slow

HEARTBEAT_S = 10  # the lost-process tests: how soon a killed process is noticed
# Every other run: a pause of the whole machine longer than the heartbeat (a VM snapshot, seen
# as "virtual machine fork" in dmesg during one run here) makes the coordinator drop a process.
PAUSE_TOLERANT_HEARTBEAT_S = 120
# A short run with pre-trained label embeddings (the stage every process takes part in).
RUN = dict(total_steps=4, checkpoint_every=2, eval_every=4, log_every=1,
           **{"label_embeddings.source": "pretrain", "label_embeddings.pretrain_steps": 2})

_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_demo_config

def get_config():
  return tiny_demo_config({data!r}, **{run!r})
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(index: int, port: int, heartbeat_s: int) -> dict:
  env = child_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                  JAX_PROCESS_ID=str(index), USSS_HEARTBEAT_TIMEOUT_S=str(heartbeat_s))
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                      "--xla_backend_optimization_level=0")
  return env


class Pair:
  """Two processes of one run; their stdout and stderr go to <logs>/<tag>.<index>.txt."""

  def __init__(self, config_file: str, workdir: pathlib.Path, logs: pathlib.Path, tag: str,
               heartbeat_s: int = PAUSE_TOLERANT_HEARTBEAT_S):
    port = _free_port()
    self.logs = [logs / f"{tag}.{i}.txt" for i in (0, 1)]
    self.procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), f"--config={config_file}",
         f"--workdir={workdir}"], cwd=ROOT, env=_env(i, port, heartbeat_s),
        stdout=open(self.logs[i], "w"), stderr=subprocess.STDOUT) for i in (0, 1)]

  def wait(self, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(1.0, deadline - time.time())) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"hung; logs:\n{self.log(0)[-2000:]}\n---\n{self.log(1)[-2000:]}")

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def log(self, index: int) -> str:
    return self.logs[index].read_text()


@pytest.fixture(scope="module")
def config_file(demo_root, tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("multiprocess") / "config.py"
  path.write_text(_CONFIG.format(tests=str(ROOT / "tests"), data=demo_root, run=RUN))
  return str(path)


def _final_state(workdir: pathlib.Path, demo_root: str) -> dict:
  config = tiny_demo_config(demo_root, **RUN)
  spaces = json.loads((workdir / "label_spaces.json").read_text())["domains"]
  _, state, _ = state_lib.restore(config, str(workdir), [len(s["classes"]) for s in spaces],
                                  tuple(spaces[0]["crop_hw"]), which="latest")
  return state


def _wait_for_step(workdir: pathlib.Path, step: int, pair: Pair, timeout: float = 900) -> None:
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in pair.procs):
    if metrics.exists() and any(r.get("kind") == "train" and r["step"] >= step
                                for r in metric_writers.read_records(str(metrics))):
      return
    time.sleep(0.05)
  pair.kill()
  raise AssertionError(f"no step {step}; logs:\n{pair.log(0)[-2000:]}\n---\n{pair.log(1)[-2000:]}")


@pytest.fixture(scope="module")
def ten_starts(config_file, demo_root, tmp_path_factory) -> tuple[pathlib.Path, dict]:
  """Ten fresh two-process starts of RUN (once per test run, whichever worker asks first);
  (the first workdir, its final state)."""
  def start_ten_times(root: pathlib.Path) -> None:
    states = []
    for attempt in range(10):
      workdir = root / f"run{attempt}"
      pair = Pair(config_file, workdir, root, f"start{attempt}")
      codes = pair.wait(timeout=1200)
      assert codes == [0, 0], (f"start {attempt}: exit {codes}\n{pair.log(0)[-3000:]}\n---\n"
                               f"{pair.log(1)[-3000:]}")
      states.append(_final_state(workdir, demo_root))
    for state in states[1:]:
      assert_same_params(states[0], state)
  root = built_once(tmp_path_factory, "ten_starts", start_ten_times)
  return root / "run0", _final_state(root / "run0", demo_root)


def test_ten_fresh_starts_in_a_row_succeed_and_only_process_0_writes(ten_starts):
  workdir, _ = ten_starts
  # One writer: every shared file exists once, whole; the metrics hold each step once.
  records = metric_writers.read_records(str(workdir / "metrics.jsonl"))
  assert [r["step"] for r in records if r.get("kind") == "train"] == [1, 2, 3, 4]
  assert [r["step"] for r in records if r.get("kind") == "eval"] == [4]
  for name in ("street", "indoor"):
    assert (workdir / "label_embeddings" / f"{name}.npz").stat().st_size > 0
    assert (workdir / "splits" / f"{name}.json").exists()
  assert not list(workdir.rglob("*.tmp"))


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(
    ten_starts, config_file, demo_root, tmp_path):
  _, reference = ten_starts
  workdir = tmp_path / "run"
  pair = Pair(config_file, workdir, tmp_path, "first")
  _wait_for_step(workdir, 1, pair)
  pair.procs[1].send_signal(signal.SIGTERM)
  assert pair.wait(timeout=600) == [0, 0], pair.log(0)[-3000:] + pair.log(1)[-3000:]
  stopped = [[line for line in pair.log(i).splitlines() if "stopped by SIGTERM at step" in line]
             for i in (0, 1)]
  assert stopped[0] and stopped[1], pair.log(0)[-3000:] + pair.log(1)[-3000:]
  steps = {int(lines[0].split("at step ")[1].split(";")[0]) for lines in stopped}
  assert len(steps) == 1, stopped  # the same step on both
  step = steps.pop()
  assert step < RUN["total_steps"]
  checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints[-1] == step
  assert not list((workdir / "checkpoints").glob("*tmp*"))
  resumed = Pair(config_file, workdir, tmp_path, "resumed")
  assert resumed.wait(timeout=1200) == [0, 0], resumed.log(0)[-3000:] + resumed.log(1)[-3000:]
  assert f"resumed from {workdir}/checkpoints at step {step}" in resumed.log(0)
  assert_same_params(reference, _final_state(workdir, demo_root))


def test_a_process_that_falls_behind_after_the_start_does_not_break_the_run(config_file,
                                                                           tmp_path):
  """Process 1 stopped (SIGSTOP) for 45 s right after the processes met, as a loaded host
  falls behind: it reaches every collective long after process 0, and the run ends normally.
  Gloo gives a device group's first collective 30 s for all processes to arrive, so every
  group is connected while the processes stand together at the start."""
  stall_s = 45
  pair = Pair(config_file, tmp_path / "run", tmp_path, "stalled", heartbeat_s=10 * stall_s)
  started = "jax.distributed: process 1 of 2"
  deadline = time.time() + 600
  while started not in pair.log(1):
    assert time.time() < deadline and all(p.poll() is None for p in pair.procs), \
        pair.log(0)[-3000:] + pair.log(1)[-3000:]
    time.sleep(0.05)
  pair.procs[1].send_signal(signal.SIGSTOP)
  time.sleep(stall_s)
  pair.procs[1].send_signal(signal.SIGCONT)
  assert pair.wait(timeout=1200) == [0, 0], pair.log(0)[-3000:] + "\n---\n" + pair.log(1)[-3000:]
  # Gloo announces each connection it makes, one "[Gloo] Rank ..." line per local device (the
  # threads' lines may interleave mid-line): both processes' groups (2 gather groups, the
  # training mesh) connect before the run begins; later only evaluation's process-local group.
  for index in (0, 1):
    log = pair.log(index)
    begun = log.index(f"jax.distributed: process {index} of 2")
    assert log[:begun].count("[Gloo] Rank") == 4, log[:begun]
    assert log[begun:].count("[Gloo] Rank") <= 2, log[begun:][-3000:]


@pytest.mark.parametrize("victim", [1, 0])
def test_sigkill_of_one_process_stops_the_other_naming_it(config_file, tmp_path, victim):
  workdir = tmp_path / "run"
  pair = Pair(config_file, workdir, tmp_path, "run", heartbeat_s=HEARTBEAT_S)
  _wait_for_step(workdir, 1, pair)
  pair.procs[victim].kill()
  killed_at = time.time()
  survivor = 1 - victim
  code = pair.wait(timeout=HEARTBEAT_S + 120)[survivor]
  took = time.time() - killed_at
  log = pair.log(survivor)
  errors = [line for line in error_lines(log) if line.startswith("error: ")]
  assert code == 2 and len(errors) == 1, log[-3000:]
  assert f"process {victim} of 2" in errors[0], errors
  assert "Traceback" not in log and "Check failure" not in log, log[-3000:]
  assert took < HEARTBEAT_S + 60, took
  print(f"process {survivor} stopped {took:.1f} s after process {victim} was killed")
