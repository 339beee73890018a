"""What every dataset reader provides: a spec, sorted examples, checked loading.

A reader maps a dataset's official on-disk layout to `Example`s (an image path and
a label path paired by name) and decodes labels to *train ids*: `0..C-1` for the
classes and `spec.ignore_label` (255) for void. Everything downstream (pipeline,
metrics, palettes, result tables) is driven by the `DatasetSpec`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Sequence

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
# What a label value outside the class map does (config.invalid_labels): stop the run naming the
# file, or count as void (ignore) with one warning per file.
INVALID_LABEL_POLICIES = ("error", "ignore")

log = logging.getLogger("usss_jax")
_reported_lock = threading.Lock()
_reported_invalid: set[str] = set()


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


def _check_size(array: np.ndarray, path: str, what: str) -> np.ndarray:
  if array.size == 0:
    raise DataError(f"{path}: {what} decodes to {array.shape[1] if array.ndim > 1 else 0}x"
                    f"{array.shape[0]} pixels; replace the file or remove it from the dataset")
  return array


def load_rgb(path: str) -> np.ndarray:
  """Decodes an image file to [H, W, 3] uint8; DataError naming the file if unreadable.

  16-bit grayscale images are scaled to 8 bits (value / 256); 32-bit integer or float images
  are an error (no scale to assume).
  """
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode.startswith("I;16"):
        gray = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
        return _check_size(np.repeat(gray[..., None], 3, axis=-1), path, "image")
      if im.mode in ("I", "F"):
        raise DataError(f"{path}: image of mode {im.mode!r} (32 bits per pixel); expected "
                        "8-bit RGB or grayscale (or 16-bit grayscale): convert it")
      return _check_size(np.asarray(im.convert("RGB"), dtype=np.uint8), path, "image")
  except FileNotFoundError as e:
    raise DataError(f"{path}: image file does not exist") from e
  except DataError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: unreadable or truncated image ({e})") from e


def load_label_png(path: str) -> np.ndarray:
  """Decodes a single-channel label PNG to [H, W] int32 raw values (no mapping).

  8- and 16-bit grayscale, palette and bilevel PNGs hold the values directly; an RGB(A) or
  grayscale+alpha PNG whose colour channels are all equal (a grayscale label saved in colour)
  holds them in its first channel. Colour-coded labels are an error naming a colour found.
  """
  try:
    with Image.open(path) as im:
      im.load()
      arr = np.asarray(im)
      if im.mode in ("1", "L", "P", "I") or im.mode.startswith("I;16"):
        return _check_size(arr.astype(np.int32), path, "label image")
      if im.mode in ("LA", "RGB", "RGBA"):
        colour = arr[..., :1] if im.mode == "LA" else arr[..., :3]
        alpha = arr[..., -1] if im.mode in ("LA", "RGBA") else None
        if (colour == colour[..., :1]).all() and (alpha is None or (alpha == 255).all()):
          return _check_size(colour[..., 0].astype(np.int32), path, "label image")
        differing = np.argwhere((colour != colour[..., :1]).any(-1))
        found = (f"e.g. colour {tuple(int(v) for v in arr[tuple(differing[0])])}"
                 if len(differing) else "a transparent pixel")
        raise DataError(f"{path}: label image of mode {im.mode!r} with {found}; expected "
                        "class ids in one channel (an L, P or 16-bit PNG): convert "
                        "colour-coded labels to class ids")
      raise DataError(f"{path}: label image has mode {im.mode!r}; expected a single-channel "
                      "(L/P/I) PNG of class ids")
  except FileNotFoundError as e:
    raise DataError(f"{path}: label file does not exist") from e
  except DataError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: unreadable or truncated label image ({e})") from e


def map_label_values(raw: np.ndarray, lut: np.ndarray, path: str,
                     invalid: str = "error") -> np.ndarray:
  """Maps raw label values to train ids through a lookup table.

  Args:
    raw: [H, W] int raw values.
    lut: [V] int table; entries < 0 mark values that must not occur.
    path: file name for the error message.
    invalid: a value outside the table: "error" (DataError naming the file, the values and
      the fix) or "ignore" (void, 255; one warning per file with the pixel count).
  Returns:
    [H, W] uint8 train ids (255 = ignore).
  """
  bad = (raw < 0) | (raw >= len(lut))
  mapped = lut[np.clip(raw, 0, len(lut) - 1)]
  bad |= mapped < 0
  if bad.any():
    vals = np.unique(raw[bad])[:10].tolist()
    if invalid != "ignore":
      raise DataError(f"{path}: label values {vals} are outside the class map (valid raw values:"
                      f" {np.flatnonzero(lut >= 0).tolist()}): correct the file, or set "
                      "--config.invalid_labels=ignore to count such pixels as void")
    with _reported_lock:
      first = path not in _reported_invalid
      _reported_invalid.add(path)
    if first:
      log.warning("%s: %d pixel(s) with label values %s outside the class map count as void "
                  "(config.invalid_labels=ignore)", path, int(bad.sum()), vals)
    mapped = np.where(bad, IGNORE_LABEL, mapped)
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
  # config.invalid_labels (INVALID_LABEL_POLICIES), set by usss_jax.domains.
  invalid_labels: str = "error"

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
            f"not match image {ex.image_path} size {image.shape[1]}x{image.shape[0]}: "
            "resize the label to its image (nearest neighbour) or remove the pair")
      out["label"] = label
    return out
