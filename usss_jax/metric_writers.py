"""TensorFlow-free training logs: JSON lines and TensorBoard events.

clu.metric_writers imports TensorFlow and tensorboard at import time, so event
files are written with tensorboardX instead.

Files in `workdir`:
  metrics.jsonl   one JSON object per write ({"step", "kind": "train"|"eval"|
                  "hparams", ...}), each line appended by one write() so a killed
                  run keeps everything it logged. Strict JSON: NaN/Inf become null.
                  A line torn by a kill mid-write is cut off when the run resumes;
                  `read_records` skips an unterminated last line (a write in flight).
  tensorboard/    tensorboardX event files (scalars, images, hparams).

Resuming at step S (`MetricWriter(..., resume_step=S)`): the steps after S are run again, so
their records are dropped from metrics.jsonl (rewritten atomically) and TensorBoard is told to
hide their events (`purge_step`), so that the replay writes them once. Lines that do not read
(a damaged file) are dropped with one warning naming the file; the rest is kept. A write that
fails for want of space is a `files.WriteError`.

Multi-host: construct with `enabled=jax.process_index() == 0`; a disabled
writer creates no files and ignores every call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from typing import Any

from flax import traverse_util
import numpy as np
import tensorboardX
from tensorboardX import summary

from usss_jax import files

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"

log = logging.getLogger("usss_jax")
# Writes of tensorboardX's background thread that failed for want of space (it would print a
# traceback and die): reported by the writer's next call instead (`_tensorboard_failed`).
_TENSORBOARD_FAILURES: list[OSError] = []


def _catch_tensorboard_thread_failures() -> None:
  if getattr(threading.excepthook, "usss_tensorboard", False):
    return
  default = threading.excepthook

  def hook(args):
    if type(args.thread).__name__ == "_EventLoggerThread" and files.no_space(args.exc_value):
      _TENSORBOARD_FAILURES.append(args.exc_value)
    else:
      default(args)
  hook.usss_tensorboard = True
  threading.excepthook = hook


def read_records(path: str, offset: int = 0) -> list[dict]:
  """The complete JSON lines of a metrics.jsonl past byte `offset`; an unterminated last
  line (being written by a live run, or torn by a kill) is left out."""
  with open(path, "rb") as f:
    f.seek(offset)
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line]


def prepare_for_resume(path: str, resume_step: int | None) -> set[int]:
  """Makes metrics.jsonl hold only whole, readable records of steps up to `resume_step`
  (None: all steps; 0: nothing of an earlier start, hparams included); returns the steps
  that have an evaluation record. One warning names the file if it was damaged or torn."""
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    data = f.read()
  kept, unreadable, later = [], 0, 0
  lines = data.split(b"\n")
  torn = len(lines[-1])  # bytes after the last newline: a write cut short by a kill
  for line in lines[:-1]:
    try:
      record = json.loads(line.decode("utf-8"))
      if not isinstance(record, dict):
        raise ValueError("not an object")
    except ValueError:
      unreadable += 1
      continue
    step = record.get("step", 0)
    if resume_step is not None and (step > resume_step or (resume_step == 0 and "step" not in
                                                            record)):
      later += 1
    else:
      kept.append(line + b"\n")
  if unreadable or torn or later:
    with files.atomic_write(path, "wb") as f:
      f.write(b"".join(kept))
  if unreadable:
    log.warning("%s: dropped %d line(s) that do not read (a damaged file)%s; the %d readable "
                "record(s) are kept", path, unreadable,
                f" and a torn last line ({torn} bytes)" if torn else "", len(kept))
  elif torn:
    log.warning("%s: cut off %d bytes after the last complete line (a line torn by a kill, or "
                "damage); %d record(s) kept", path, torn, len(kept))
  if later:
    log.info("%s: dropped %d record(s) after step %d, whose steps run again", path, later,
             resume_step)
  return {r["step"] for r in map(json.loads, kept) if r.get("kind") == "eval"}


class NonFiniteLossError(FloatingPointError):
  """A logged loss/metric became NaN or Inf."""

  def __init__(self, step: int, name: str, value: float, kept_step: int | None = None):
    self.step, self.name, self.value = step, name, value
    kept = "" if kept_step is None else f"; the last good checkpoint, step {kept_step}, is kept"
    super().__init__(f"non-finite {name}={value} at step {step}{kept}")


def _to_number(value: Any, name: str) -> int | float | bool:
  """Python int/float/bool from a Python, NumPy or JAX scalar (or size-1 array)."""
  if isinstance(value, (bool, int, float)):
    return value
  array = np.asarray(value)
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number)
                             or array.dtype == np.bool_):
    raise ValueError(f"metric {name!r}: expected a number, got {type(value).__name__} "
                     f"with shape {array.shape} and dtype {array.dtype}")
  return array.reshape(()).item()


def check_finite(step: int, metrics: Mapping[str, Any], kept_step: int | None = None) -> None:
  """Raises NonFiniteLossError for the first NaN/Inf value in `metrics`.

  The terms are checked before their sum "loss", so the error names the term that broke;
  `kept_step` (the newest checkpoint) goes into the message.
  """
  for name in sorted(metrics, key=lambda n: n == "loss"):
    number = float(_to_number(metrics[name], name))
    if not math.isfinite(number):
      raise NonFiniteLossError(int(step), name, number, kept_step)


def _is_scalar_number(value: Any) -> bool:
  if isinstance(value, bool):
    return False
  if isinstance(value, (int, float)):
    return True
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
    array = np.asarray(value)
    return array.ndim == 0 and np.issubdtype(array.dtype, np.number)
  return False


class MetricWriter:
  """Writes train/eval scalars, images and hparams to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    """
    Args:
      workdir: run directory (created if missing).
      enabled: False on non-zero processes: no files, every call is a no-op.
      tensorboard: also write event files under <workdir>/tensorboard.
      resume_step: the step a run resumes at (module doc); None keeps every record.
    """
    self.workdir = workdir
    self.enabled = enabled
    self._jsonl: int | None = None  # O_APPEND file descriptor
    self._tb = None
    self.eval_steps: set[int] = set()  # steps with an evaluation record
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILENAME)
    self.eval_steps = prepare_for_resume(self.path, resume_step)
    self._jsonl = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if tensorboard:
      logdir = os.path.join(workdir, TENSORBOARD_SUBDIR)
      # Events of steps after resume_step, written before, are hidden by TensorBoard.
      purge = resume_step + 1 if resume_step is not None and os.path.isdir(logdir) else None
      _catch_tensorboard_thread_failures()
      # The suffix keeps two starts within one second from writing one file name.
      self._tb = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30, purge_step=purge,
                                            filename_suffix=f".{os.getpid()}.{id(self)}")

  def _tensorboard_failed(self, error: BaseException | None = None) -> None:
    """Raises the WriteError of a TensorBoard write that failed for want of space."""
    error = error or (_TENSORBOARD_FAILURES[-1] if _TENSORBOARD_FAILURES else None)
    reason = files.no_space(error)
    if reason:
      raise files.write_failed(os.path.join(self.workdir, TENSORBOARD_SUBDIR), reason,
                               "the checkpoints and metrics.jsonl are intact") from error

  def _write_line(self, record: Mapping[str, Any]) -> None:
    self._tensorboard_failed()
    # One unbuffered write per line: a reader or a kill sees whole lines or one torn tail.
    data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    try:
      while data:
        data = data[os.write(self._jsonl, data):]
    except OSError as e:
      reason = files.no_space(e)
      if not reason:
        raise
      raise files.write_failed(self.path, reason, "the checkpoints and the lines written "
                               "before are intact") from e

  @staticmethod
  def _check_reserved(values: Mapping[str, Any]) -> None:
    clash = {"step", "kind"} & set(values)
    if clash:
      raise ValueError(f"metric names {sorted(clash)} are reserved in {METRICS_FILENAME}")

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *,
                    kind: str = "train") -> None:
    """One JSON line {"step", "kind", **scalars} plus one TensorBoard scalar "<kind>/<name>"."""
    if not self.enabled:
      return
    self._check_reserved(scalars)
    numbers = {name: _to_number(value, name) for name, value in scalars.items()}
    step = int(step)
    self._write_line({"step": step, "kind": kind,
                      **files.to_json(numbers, "scalars")})
    if self._tb is not None:
      for name, value in numbers.items():
        self._tb.add_scalar(f"{kind}/{name}", float(value), step)

  def write_eval(self, step: int, results: Mapping[str, Any]) -> None:
    """JSON line {"step", "kind": "eval", **results} (nested, arrays as lists).

    TensorBoard gets every scalar number under "eval/", nested dict keys joined with "/"
    (e.g. "eval/cityscapes/miou"); lists go to JSON only.
    """
    if not self.enabled:
      return
    self._check_reserved(results)
    step = int(step)
    self._write_line({"step": step, "kind": "eval", **files.to_json(dict(results), "results")})
    if self._tb is not None:
      for name, value in traverse_util.flatten_dict(dict(results), sep="/").items():
        if _is_scalar_number(value):
          self._tb.add_scalar(f"eval/{name}", float(np.asarray(value)), step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """TensorBoard images: uint8 [H, W, 3] under `name`, [N, H, W, 3] under `name/i`."""
    if not self.enabled or self._tb is None:
      return
    for name, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"image {name!r}: expected uint8 [H, W, 3] or [N, H, W, 3], "
                         f"got {image.dtype} {image.shape}")
      if image.ndim == 3:
        self._tb.add_image(name, image, int(step), dataformats="HWC")
      else:
        for i, single in enumerate(image):
          self._tb.add_image(f"{name}/{i}", single, int(step), dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Flattened config ("optim/base_lr": 0.01) as a JSON line and TensorBoard hparams.

    Values other than bool/int/float/str (lists, None, ...) are written as strings.
    """
    if not self.enabled:
      return
    flat = {}
    for name, value in traverse_util.flatten_dict(dict(hparams), sep="/").items():
      if isinstance(value, (bool, int, float, str)):
        flat[name] = value
      elif isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        flat[name] = np.asarray(value).item()
      else:
        flat[name] = str(value)
    self._write_line({"kind": "hparams",
                      "hparams": files.to_json(flat, "hparams")})
    if self._tb is not None:
      file_writer = self._tb._get_file_writer()  # pylint: disable=protected-access
      # Written into the run's own event file (SummaryWriter.add_hparams would
      # open a new sub-run directory).
      for proto in summary.hparams(flat, {}):
        file_writer.add_summary(proto)

  def eval_record(self, step: int) -> dict:
    """The last evaluation record of `step` in metrics.jsonl ({} if there is none)."""
    evals = [r for r in read_records(self.path) if r.get("kind") == "eval"
             and r.get("step") == step]
    return evals[-1] if evals else {}

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      os.close(self._jsonl)
      self._jsonl = None
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except OSError as e:
        self._tensorboard_failed(e)
        raise
    self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
