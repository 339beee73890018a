"""One run per work directory: a lock, stop requests (SIGTERM / SIGINT), clean failed starts.

`RunGuard(workdir)` around a run (launcher modes train and embed):

- writes `<workdir>/run.lock` (the holder's pid and host) or refuses with WorkdirInUseError
  naming the pid of a live holder; a lock whose process is gone is taken over with a warning;
- turns the first SIGTERM / SIGINT into a stop request: the training loop finishes the
  current step, saves a checkpoint at it and raises `Stopped` (the launcher exits 0); a second
  signal ends the process the default way;
- when the work directory was new (absent or empty) and the run fails before its first
  training step, removes everything the run created, so the next attempt starts clean.

Multi-host: only process 0 writes the lock and cleans up; every process installs the
handlers (a cluster signals every process; the loop agrees on stopping across processes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time

log = logging.getLogger("usss_jax")

LOCK_FILE = "run.lock"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The guard of the running process (signals and training progress are process-wide).
_active: RunGuard | None = None


class WorkdirInUseError(RuntimeError):
  """Another live process holds the work directory's lock."""


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
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
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
      self._acquire_lock()
    if threading.current_thread() is threading.main_thread():
      for sig in _STOP_SIGNALS:
        self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
    _active = self
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    global _active
    _active = None
    for sig, handler in self._previous_handlers.items():
      signal.signal(sig, handler)
    self._previous_handlers = {}
    if not self.is_main:
      return
    failed_start = (exc is not None and not isinstance(exc, Stopped) and not self.trained
                    and self._was_new)
    if failed_start:
      self._remove_created()
    else:
      self._release_lock()

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
