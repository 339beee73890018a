"""One run per work directory: a lock, stop requests (SIGTERM / SIGINT), clean failed starts,
and the processes of a multi-process run (shared files, lost processes).

`RunGuard(workdir)` around a run (launcher modes train and embed):

- writes `<workdir>/run.lock` (the holder's pid and host) or refuses with WorkdirInUseError
  naming the pid of a live holder; a lock whose process is gone is taken over with a warning;
- turns the first SIGTERM / SIGINT into a stop request: the training loop finishes the
  current step, saves a checkpoint at it and raises `Stopped` (the launcher exits 0); a second
  signal ends the process the default way;
- when the work directory was new (absent or empty) and the run fails before its first
  training step, removes everything the run created, so the next attempt starts clean.

Multi-host: only process 0 writes the lock and cleans up; every process installs the
handlers (the loop agrees on stopping across processes). `main_process_first` lets process 0
write a shared file (splits, label embeddings) while the others wait for it. A process that
stops with an error announces it; the others notice a lost process (a collective fails, or the
heartbeats stop) and stop with one `ProcessLostError` line naming it, within the heartbeat
timeout, leaving without jax's shutdown barrier (which would wait for the lost process). Where
jax's coordination client itself aborts a process with a C++ trace, the launcher's
`supervise` turns that into one error line naming the lost process.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from usss_jax import sharding

log = logging.getLogger("usss_jax")

LOCK_FILE = "run.lock"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The guard of the running process (signals and training progress are process-wide).
_active: RunGuard | None = None


class WorkdirInUseError(RuntimeError):
  """Another live process holds the work directory's lock."""


class ProcessLostError(RuntimeError):
  """Another process of a multi-process run stopped (killed, or failed with an error)."""


class Stopped(Exception):
  """Training stopped on a stop request after saving a checkpoint at `step`."""

  def __init__(self, step: int, signal_name: str):
    self.step, self.signal_name = step, signal_name
    super().__init__(f"stopped by {signal_name} at step {step}; the checkpoint of that step "
                     "is saved: run the same command again to resume")


def stop_requested() -> str | None:
  """Name of the signal that asked this process to stop (SIGTERM, SIGINT), or None."""
  return _active.stop_signal if _active is not None else None


def note_training_step() -> None:
  """Called by the training loop after a step: a failure from here on keeps the workdir."""
  if _active is not None:
    _active.trained = True


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) is gone
      return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
  except ProcessLookupError:
    return False
  except OSError:  # exists, owned by someone else, or no /proc
    return True


def _read_holder(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.load(f)
    return holder if isinstance(holder.get("pid"), int) else None
  except (OSError, ValueError, AttributeError):
    return None


class RunGuard:
  """Context manager: lock `workdir`, catch stop signals, undo a failed start (module doc)."""

  def __init__(self, workdir: str, *, is_main: bool = True):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.lock_path = os.path.join(self.workdir, LOCK_FILE)
    self.is_main = is_main
    self.stop_signal: str | None = None
    self.trained = False
    self._was_new = False
    self._existed = False
    self._previous_handlers: dict[int, object] = {}

  def __enter__(self) -> RunGuard:
    global _active
    if _active is not None:
      raise WorkdirInUseError(f"a run guard is already active in this process (for "
                              f"{_active.workdir})")
    self._existed = os.path.isdir(self.workdir)
    self._was_new = not self._existed or not os.listdir(self.workdir)
    if self.is_main:
      os.makedirs(self.workdir, exist_ok=True)
      try:
        self._acquire_lock()
      except BaseException as e:
        if jax.process_count() > 1:
          _on_failure(e)
        raise
    if threading.current_thread() is threading.main_thread():
      for sig in _STOP_SIGNALS:
        self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
    _active = self
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    global _active
    _active = None
    for sig, handler in self._previous_handlers.items():
      # None: a handler installed outside Python (jax's preemption notifier), gone now.
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous_handlers = {}
    replacement = None
    if jax.process_count() > 1 and exc is not None and not isinstance(exc, Stopped):
      replacement = _on_failure(exc)
    if self.is_main:
      failed_start = (exc is not None and not isinstance(exc, Stopped) and not self.trained
                      and self._was_new)
      if failed_start and jax.process_count() == 1:
        self._remove_created()
      else:
        self._release_lock()
    if replacement is not None:
      raise replacement from exc

  def _on_signal(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.stop_signal is not None:  # the second one: end now, the default way
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.stop_signal = name
    log.warning("%s received: stopping after the current step with a checkpoint "
                "(send it again to stop at once, without one)", name)

  def _acquire_lock(self) -> None:
    # The complete lock is linked into place: the link fails if a lock exists, and a lock
    # that exists is never half written.
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    tmp = f"{self.lock_path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(record, f)
    try:
      while True:
        try:
          os.link(tmp, self.lock_path)
          return
        except FileExistsError:
          pass
        holder = _read_holder(self.lock_path)
        if holder is not None:
          pid, host = holder["pid"], holder.get("host")
          if host not in (None, record["host"]):
            raise WorkdirInUseError(
                f"{self.workdir} is in use by process {pid} on host {host} ({self.lock_path});"
                f" if that run is gone, delete the lock file")
          if pid == os.getpid() or _process_alive(pid):
            raise WorkdirInUseError(
                f"{self.workdir} is in use by process {pid} ({self.lock_path}); wait for it, "
                f"stop it (kill -TERM {pid}) or choose another --workdir")
        log.warning("taking over the stale lock %s of process %s, which is no longer running",
                    self.lock_path, holder["pid"] if holder else "(unreadable lock)")
        try:
          os.remove(self.lock_path)
        except FileNotFoundError:
          pass  # another process took it over first; try again
    finally:
      os.remove(tmp)

  def _release_lock(self) -> None:
    holder = _read_holder(self.lock_path)
    if holder is not None and holder["pid"] == os.getpid():
      os.remove(self.lock_path)

  def _remove_created(self) -> None:
    """Puts a new work directory back as it was: absent, or empty."""
    if not self._existed:
      shutil.rmtree(self.workdir, ignore_errors=True)
      return
    for name in os.listdir(self.workdir):
      path = os.path.join(self.workdir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)


# Several processes (jax.distributed) ------------------------------------------------------

_KV = "usss_jax"
HEARTBEAT_ENV = "USSS_HEARTBEAT_TIMEOUT_S"
_RESTART = ("the checkpoints are kept: once every process is stopped, start all of them again "
            "with the same command to resume")
_LOST_PEER = ("Gloo", "Connection closed by peer", "Connection reset", "connection refused",
              "UNAVAILABLE", "Socket closed")
_sequence: dict[str, Iterator[int]] = {}


def _client():  # the coordination service's client on several processes
  return jax_distributed.global_state.client if jax.process_count() > 1 else None


def initialize_distributed(**kwargs) -> None:
  """`jax.distributed.initialize(**kwargs)`; registers this process's pid and host (named when
  it is lost) and connects the collectives. Heartbeat timeout: `$USSS_HEARTBEAT_TIMEOUT_S`."""
  if os.environ.get(HEARTBEAT_ENV):
    kwargs.setdefault("heartbeat_timeout_seconds", int(os.environ[HEARTBEAT_ENV]))
  jax.distributed.initialize(**kwargs)
  _client().key_value_set(f"{_KV}/process/{jax.process_index()}",
                          json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                          allow_overwrite=True)
  _connect_collectives()


def _connect_collectives() -> None:
  """Connects the run's cross-process device groups (multihost_utils' gathers, the training
  mesh) at one barrier: gloo gives a group's first collective 30 s for all processes to
  arrive, later ones wait as long as needed; a loaded host can be minutes late (FAULTS.md)."""
  _client().wait_at_barrier(f"{_KV}/connect_collectives", 3600 * 1000)
  multihost_utils.process_allgather(np.int32(jax.process_index()))
  mesh = sharding.make_mesh()
  ones = jax.make_array_from_callback((jax.device_count(),), sharding.batch_sharded(mesh),
                                      lambda index: np.ones(1, np.int32))
  jax.block_until_ready(jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(ones))


def _process_info(index: int) -> dict | None:
  """{"pid", "host"} of a process, as registered by `initialize_distributed`, or None."""
  try:
    return json.loads(_client().key_value_try_get(f"{_KV}/process/{index}"))
  except Exception:  # pylint: disable=broad-except  # not registered, or the service is gone
    return None


def describe_process(index: int) -> str:
  """"process 1 of 2 (pid 4242 on host a)", as far as the coordination service knows."""
  info = _process_info(index)
  where = f" (pid {info['pid']} on host {info['host']})" if info else ""
  return f"process {index} of {jax.process_count()}{where}"


def _lost_processes() -> tuple[list[int], dict[int, str]]:
  """(processes known to be gone, {process: the error it announced}); the coordination
  service gone means process 0 (which runs it) is."""
  try:
    failed = {int(k.rsplit("/", 1)[1]): v for k, v in
              _client().key_value_dir_get(f"{_KV}/failed/")}
  except Exception:  # pylint: disable=broad-except
    return ([0] if jax.process_index() else []), {}
  gone = []
  for index in range(jax.process_count()):
    info = _process_info(index)
    if info and info["host"] == socket.gethostname() and not _process_alive(info["pid"]):
      gone.append(index)
  return gone, failed


def _lost_message(detail: str) -> str:
  gone, failed = _lost_processes()
  if failed:
    index, error = sorted(failed.items())[0]
    return f"{describe_process(index)} stopped with an error ({error}); {_RESTART}"
  who = ", ".join(describe_process(i) for i in gone) if gone else "another process"
  return f"lost {who}: it stopped without a word (killed?) ({detail}); {_RESTART}"


def _first_line(error) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _leave_without_shutdown_barrier(code: int) -> None:
  """At exit, skips jax's distributed shutdown (its barrier would wait for a lost process)."""
  def leave():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  atexit.register(leave)  # runs before jax's own exit handler (registered earlier)


def _on_failure(exc: BaseException) -> BaseException | None:
  """A multi-process run ends with `exc`: a ProcessLostError naming the lost process when
  `exc` comes from losing one; else `exc` is announced to the other processes."""
  lost = isinstance(exc, ProcessLostError) or (
      isinstance(exc, jax.errors.JaxRuntimeError) and any(m in str(exc) for m in _LOST_PEER))
  _leave_without_shutdown_barrier(2)
  if lost and not isinstance(exc, ProcessLostError):
    return ProcessLostError(_lost_message(_first_line(exc)))
  if not lost:
    with contextlib.suppress(Exception):
      _client().key_value_set(f"{_KV}/failed/{jax.process_index()}",
                              f"{type(exc).__name__}: {_first_line(exc)}")
  return None


def _shared_key(kind: str, name: str) -> str:
  """The key of the next `kind` step named `name` (the same sequence on every process)."""
  return f"{_KV}/{kind}/{name}/{next(_sequence.setdefault(f'{kind}/{name}', itertools.count()))}"


def _peer_failed(name: str, result: str) -> ProcessLostError:
  return ProcessLostError(f"{describe_process(0)} stopped with an error ({result[len('error:'):]})"
                          f" while preparing {name}; see its output")


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[bool]:
  """Process 0 runs the block first (it writes the shared files); the others wait for it, then
  run the block themselves (reading them). Yields whether this process may write. One process:
  runs the block. The others raise ProcessLostError if process 0 fails in the block."""
  client = _client()
  if client is None:
    yield True
    return
  key = _shared_key("first", name)
  if jax.process_index() == 0:
    try:
      yield True
    except BaseException as e:
      client.key_value_set(key, f"error:{type(e).__name__}: {_first_line(e)}")
      raise
    client.key_value_set(key, "ok")
    return
  result = client.blocking_key_value_get(key, 24 * 3600 * 1000)
  if result != "ok":
    raise _peer_failed(name, result)
  yield False


def broadcast_decision(name: str, decide) -> str:
  """`decide()` (a string, e.g. "load" or "compute") run on process 0, returned on every
  process, so that all of them take the same branch (and meet in the same collectives)."""
  client = _client()
  if client is None:
    return decide()
  key = _shared_key("decision", name)
  if jax.process_index() == 0:
    try:
      value = decide()
    except BaseException as e:
      client.key_value_set(key, f"error:{type(e).__name__}: {_first_line(e)}")
      raise
    client.key_value_set(key, f"value:{value}")
    return value
  result = client.blocking_key_value_get(key, 24 * 3600 * 1000)
  if not result.startswith("value:"):
    raise _peer_failed(name, result)
  return result[len("value:"):]


# The launcher's supervisor (a hand-started multi-process run) ----------------------------

SUPERVISED_ENV = "USSS_SUPERVISED"
_JAX_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
_CXX_LOG = re.compile(r"^[EFW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")


def supervision_wanted() -> bool:
  """Whether this launch is one process of a hand-started multi-process run (and not yet the
  supervised child)."""
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) and not os.environ.get(SUPERVISED_ENV)


def _die_with_parent() -> None:  # in the child, before exec
  with contextlib.suppress(Exception):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a SIGKILLed parent takes it


def _lost_by_jax(held: list[str]) -> str:
  """The error line for a child that jax's coordination client ended, from its C++ log."""
  text = "".join(held)
  count, me = os.environ.get("JAX_NUM_PROCESSES", "?"), int(os.environ.get("JAX_PROCESS_ID", 0))
  found = re.findall(r"[Tt]ask (\d+) heartbeat timeout|unhealthy[^:]*:\s*(\d+)", text)
  tasks = sorted({int(a or b) for a, b in found} - {me})
  if tasks:
    who = ", ".join(f"process {t} of {count}" for t in tasks)
    why = "it stopped sending heartbeats (killed, stopped or cut off)"
  elif me:
    who = f"process 0 of {count}"
    why = ("which runs the coordination service at "
           f"{os.environ.get('JAX_COORDINATOR_ADDRESS')}: it was killed or failed (see its output)")
  else:
    who, why = "another process", "jax's coordination service reported it failed"
  return f"error: lost {who}, {why}; {_RESTART}"


def supervise(argv: list[str]) -> int:
  """Runs `python argv...` as a child (the same launch, marked supervised) and returns its exit
  status. Its stderr passes through, except jax's fatal C++ trace when the coordination client
  ends it for a lost process: that becomes one error line naming the process (exit 2).
  SIGTERM / SIGINT are passed on; the child dies with this process."""
  child = subprocess.Popen([sys.executable, *argv], env=dict(os.environ, **{SUPERVISED_ENV: "1"}),
                           stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
  for sig in _STOP_SIGNALS:
    signal.signal(sig, lambda signum, frame: child.send_signal(signum))
  held, fatal, reported, pending = [], False, False, b""
  while chunk := os.read(child.stderr.fileno(), 65536):
    pending += chunk
    *lines, pending = re.split(rb"(?<=[\r\n])", pending)
    for line in lines:
      text = line.decode(errors="replace")
      fatal = fatal or _JAX_FATAL in text
      if fatal or _CXX_LOG.match(text):  # held back until it is clear what they are
        held.append(text)
        continue
      sys.stderr.write("".join(held) + text)
      held = []
      reported = reported or text.startswith("error: ")
    sys.stderr.flush()
  code = child.wait()
  if fatal and not reported:
    print(_lost_by_jax(held), file=sys.stderr, flush=True)
    return 2
  sys.stderr.write("".join(held) + pending.decode(errors="replace"))
  return code if code >= 0 else 128 - code
