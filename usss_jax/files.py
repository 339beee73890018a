"""Files of a run directory: one atomic writer, one JSON conversion, one reader.

Every file a run writes goes through `atomic_write` (a temporary file beside the target,
flushed, then renamed over it), so a reader or a killed process sees the old file or the new
one, never half of one; files get mode 0644 like the rest of a run directory. `to_json` is the
one conversion of NumPy / JAX values to plain JSON types.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

FILE_MODE = 0o644


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
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
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
