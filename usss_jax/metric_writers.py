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

Multi-host: construct with `enabled=jax.process_index() == 0`; a disabled
writer creates no files and ignores every call.
"""

from __future__ import annotations

import json
import logging
import math
import os
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


def read_records(path: str, offset: int = 0) -> list[dict]:
  """The complete JSON lines of a metrics.jsonl past byte `offset`; an unterminated last
  line (being written by a live run, or torn by a kill) is left out."""
  with open(path, "rb") as f:
    f.seek(offset)
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line]


def _cut_torn_tail(path: str) -> None:
  """Truncates `path` after its last newline: a line cut short by a kill mid-write would
  otherwise glue onto the first line the resumed run appends."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return  # the usual case: only the last byte is read
    f.seek(0)
    keep = f.read().rfind(b"\n") + 1
    f.truncate(keep)
  log.warning("%s: cut off a torn last line (%d bytes, from a killed run)", path, size - keep)


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

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    """
    Args:
      workdir: run directory (created if missing).
      enabled: False on non-zero processes: no files, every call is a no-op.
      tensorboard: also write event files under <workdir>/tensorboard.
    """
    self.workdir = workdir
    self.enabled = enabled
    self._jsonl: int | None = None  # O_APPEND file descriptor
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILENAME)
    _cut_torn_tail(path)
    self._jsonl = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if tensorboard:
      self._tb = tensorboardX.SummaryWriter(
          logdir=os.path.join(workdir, TENSORBOARD_SUBDIR), flush_secs=30)

  def _write_line(self, record: Mapping[str, Any]) -> None:
    # One unbuffered write per line: a reader or a kill sees whole lines or one torn tail.
    data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    while data:
      data = data[os.write(self._jsonl, data):]

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

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      os.close(self._jsonl)
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
