"""Small file helpers shared by the run directory's writers: atomic JSON and text."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text(path: str, text: str) -> str:
  """Writes `text` to `path` atomically (temporary file + rename); returns the path."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def write_json(path: str, obj: Any) -> str:
  """Writes `obj` as indented, key-sorted JSON, atomically; returns the path."""
  return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: str, what: str = "JSON file") -> Any:
  """Reads a JSON file; a ValueError names the file when it is not valid JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: cannot read the {what} ({e})") from e
