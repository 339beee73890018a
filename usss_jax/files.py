"""Files of a run directory: one atomic writer, one JSON conversion, one reader.

Every file a run writes goes through `atomic_write` (a temporary file beside the target,
flushed, then renamed over it), so a reader or a killed process sees the old file or the new
one, never half of one; files get mode 0644 like the rest of a run directory. `to_json` is the
one conversion of NumPy / JAX values to plain JSON types. A write that fails for lack of
space (full disk, quota, file-size limit) is a `WriteError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

FILE_MODE = 0o644
# A write that failed for want of space: full disk, quota, file-size limit (RLIMIT_FSIZE).
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


class WriteError(OSError):
  """A file of a run could not be written for want of space; the message names the file, the
  reason and the fix (what was written before is intact)."""

  def __init__(self, message: str):
    super().__init__(message)
    self.errno = errno.ENOSPC


def no_space(error: BaseException | None) -> str | None:
  """The reason ("No space left on device", ...) when `error` or what caused it is a write
  that failed for want of space; None otherwise. Errors of C++ libraries (tensorstore) carry
  only the text."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
      return os.strerror(error.errno)
    text = str(error)
    for reason in _NO_SPACE_TEXTS:
      if reason in text:
        return reason
    error = error.__cause__ or error.__context__
  return None


def write_failed(path: str, reason: str, kept: str = "the files written before are intact"
                 ) -> WriteError:
  """The one message of a write that failed for want of space."""
  return WriteError(f"{path}: cannot write ({reason})\nhint: {kept}; free space "
                    "on that disk (or raise the file-size limit, ulimit -f) and run the same "
                    "command again to resume")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[Any]:
  """Opens a temporary file that replaces `path` when the block ends without an exception.

  Args:
    path: the target file; its folder is created if needed.
    mode: "w" (text, UTF-8) or "wb".
  Yields:
    The open temporary file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600 files
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    reason = no_space(e)
    if reason and not isinstance(e, WriteError):
      raise write_failed(path, reason, f"{path} is as it was") from e
    raise


def write_text(path: str, text: str) -> str:
  """Writes `text` to `path` atomically; returns the path."""
  with atomic_write(path) as f:
    f.write(text)
  return path


def to_json(value: Any, where: str = "value") -> Any:
  """`value` in plain JSON types: NumPy / JAX scalars and arrays become numbers and lists,
  tuples become lists, non-finite floats become None (strict JSON).

  Raises:
    TypeError naming the entry (`where/key/...`) that has no JSON form, or a non-string key.
  """
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (int, float)):
    return None if isinstance(value, float) and not math.isfinite(value) else value
  if isinstance(value, Mapping):
    out = {}
    for key, item in value.items():
      if not isinstance(key, str):
        raise TypeError(f"{where}: dict key {key!r} is {type(key).__name__}, JSON needs str keys")
      out[key] = to_json(item, f"{where}/{key}")
    return out
  if isinstance(value, (list, tuple)):
    return [to_json(item, f"{where}/{i}") for i, item in enumerate(value)]
  if hasattr(value, "__array__"):  # NumPy and JAX arrays and scalars
    array = np.asarray(value)
    if array.dtype.kind in "biuf":
      return to_json(array.tolist(), where)
  raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def write_json(path: str, obj: Any) -> str:
  """Writes `obj` (through `to_json`) as indented, key-sorted JSON, atomically; returns the path."""
  return write_text(path, json.dumps(to_json(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str, what: str = "JSON file") -> Any:
  """Reads a JSON file; a ValueError names the file when it is not valid JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot read the {what} ({e})") from e
