"""What every dataset reader provides: a spec, sorted examples, checked loading.

A reader maps a dataset's official on-disk layout to `Example`s (an image path and
a label path paired by name) and decodes labels to *train ids*: `0..C-1` for the
classes and `spec.ignore_label` (255) for void. Everything downstream (pipeline,
metrics, palettes, result tables) is driven by the `DatasetSpec`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

IGNORE_LABEL = 255


class DataError(ValueError):
  """Bad input data; the message names the file or folder and the problem."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static description of a label space.

  Attributes:
    name: registry name, e.g. "cityscapes".
    classes: class names, index = train id.
    palette: [C, 3] uint8 colours, row = train id.
    ignore_label: value of void pixels in decoded labels.
  """
  name: str
  classes: tuple[str, ...]
  palette: tuple[tuple[int, int, int], ...]
  ignore_label: int = IGNORE_LABEL

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def palette_array(self) -> np.ndarray:
    """[C, 3] uint8."""
    return np.asarray(self.palette, np.uint8).reshape(-1, 3)


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with its (optional) label, identified by a stable key.

  `key` is unique within a split and stable across machines (a path relative to
  the dataset root without extension, or the official frame id); split lists
  written to the work directory hold keys.
  """
  key: str
  image_path: str
  label_path: str | None = None


def load_rgb(path: str) -> np.ndarray:
  """Decodes an image file to [H, W, 3] uint8; DataError naming the file if unreadable."""
  try:
    with Image.open(path) as im:
      im.load()
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except FileNotFoundError as e:
    raise DataError(f"{path}: image file does not exist") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: unreadable or truncated image ({e})") from e


def load_label_png(path: str) -> np.ndarray:
  """Decodes a single-channel label PNG to [H, W] int32 raw values (no mapping)."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("L", "P", "I", "I;16", "I;16B"):
        arr = np.asarray(im)
      else:
        raise DataError(
            f"{path}: label image has mode {im.mode!r}; expected a single-channel "
            "(L/P/I) PNG of class ids")
      return arr.astype(np.int32)
  except FileNotFoundError as e:
    raise DataError(f"{path}: label file does not exist") from e
  except DataError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: unreadable or truncated label image ({e})") from e


def map_label_values(raw: np.ndarray, lut: np.ndarray, path: str) -> np.ndarray:
  """Maps raw label values to train ids through a lookup table.

  Args:
    raw: [H, W] int raw values.
    lut: [V] int table; entries < 0 mark values that must not occur.
    path: file name for the error message.
  Returns:
    [H, W] uint8 train ids (255 = ignore).
  """
  bad = (raw < 0) | (raw >= len(lut))
  if not bad.any():
    mapped = lut[raw]
    bad = mapped < 0
  if bad.any():
    vals = np.unique(raw[bad])[:10].tolist()
    raise DataError(f"{path}: label values {vals} are outside the class map "
                    f"(valid raw values: {np.flatnonzero(lut >= 0).tolist()})")
  return mapped.astype(np.uint8)


def read_lines(path: str, what: str) -> list[str]:
  """The lines of a small text file (a list or class file); DataError naming it otherwise."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except FileNotFoundError as e:
    raise DataError(f"{path}: {what} does not exist") from e
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: unreadable {what} ({e})") from e


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise DataError(f"{path}: missing folder ({what})")
  return path


class DatasetReader:
  """Base class: subclasses set `spec` and implement `list_examples` and `decode_label`.

  Args of subclasses' __init__: `root` (dataset root in its official layout) plus
  reader-specific options.
  """

  spec: DatasetSpec

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    require_dir(self.root, f"{type(self).__name__} dataset root")

  def splits(self) -> Sequence[str]:
    """Names of the splits present on disk."""
    raise NotImplementedError

  def list_examples(self, split: str) -> list[Example]:
    """All examples of `split`, sorted by key. Raises DataError for a missing
    folder or an image without a label (labels are paired by name)."""
    raise NotImplementedError

  def decode_label(self, path: str) -> np.ndarray:
    """Reads a label file and returns [H, W] uint8 train ids (255 = ignore);
    DataError for values outside the class map."""
    raise NotImplementedError

  def load_example(self, ex: Example) -> dict:
    """Returns {"key", "image": [H,W,3] uint8, "label": [H,W] uint8 (if labelled)};
    DataError when image and label sizes differ."""
    image = load_rgb(ex.image_path)
    out = {"key": ex.key, "image": image}
    if ex.label_path is not None:
      label = self.decode_label(ex.label_path)
      if label.shape != image.shape[:2]:
        raise DataError(
            f"{ex.label_path}: label size {label.shape[1]}x{label.shape[0]} (WxH) does "
            f"not match image {ex.image_path} size {image.shape[1]}x{image.shape[0]}")
      out["label"] = label
    return out
