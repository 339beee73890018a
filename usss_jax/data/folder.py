"""Generic folder dataset, plus the pairing helpers every reader shares.

Layout (`folder` in the registry):

  <root>/classes.txt                  one class per line: `name` or `name r g b`
  <root>/images/<split>/**/*.{png,jpg,jpeg}
  <root>/labels/<split>/**/*.png      label value = class index (line number in
                                      classes.txt, from 0); 255 = ignore

An image and its label are paired by their path relative to the split folder,
without extension (`images/train/a/x.jpg` <-> `labels/train/a/x.png`, key `a/x`).
Blank lines and lines starting with `#` in classes.txt are skipped. Classes
without a colour get one from a fixed bit-interleaved palette.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from usss_jax.data import base
from usss_jax.data.base import DataError, DatasetReader, DatasetSpec, Example

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def walk_files(folder: str, suffixes: Iterable[str]) -> list[str]:
  """All files under `folder` (recursive) whose lower-cased name ends in one of
  `suffixes`, as paths relative to `folder` with "/" separators, sorted."""
  suffixes = tuple(s.lower() for s in suffixes)
  found = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames.sort()  # Deterministic walk; the final list is sorted anyway.
    rel_dir = os.path.relpath(dirpath, folder)
    for name in filenames:
      if name.lower().endswith(suffixes) and not name.startswith("."):
        rel = name if rel_dir == "." else os.path.join(rel_dir, name)
        found.append(rel.replace(os.sep, "/"))
  return sorted(found)


def index_by_key(folder: str, suffixes: Sequence[str],
                 key_of: Callable[[str], str | None]) -> dict[str, str]:
  """Maps key -> absolute path for files under `folder`.

  Args:
    folder: directory to walk (must exist).
    suffixes: file name endings to consider.
    key_of: relative path -> key, or None to ignore the file (e.g. the
      `_color.png` files next to Cityscapes label ids).
  Raises DataError when two files give the same key (ambiguous pairing).
  """
  index: dict[str, str] = {}
  for rel in walk_files(folder, suffixes):
    key = key_of(rel)
    if key is None:
      continue
    path = os.path.join(folder, rel)
    if key in index:
      raise DataError(f"{path}: same key {key!r} as {index[key]}; cannot pair "
                      "images and labels by name")
    index[key] = path
  return index


def strip_suffix(name: str, suffixes: Sequence[str]) -> str | None:
  """`name` without the first matching suffix (case-insensitive); None if none matches."""
  lower = name.lower()
  for suffix in suffixes:
    if lower.endswith(suffix.lower()):
      return name[:len(name) - len(suffix)]
  return None


def pair_by_key(images: Mapping[str, str], labels: Mapping[str, str], *,
                image_dir: str, label_dir: str,
                skip_unpaired: bool) -> tuple[list[Example], list[str]]:
  """Pairs image and label paths that share a key.

  Args:
    images, labels: key -> path.
    image_dir, label_dir: folders searched (for error messages).
    skip_unpaired: drop unpaired files instead of raising.
  Returns:
    (examples sorted by key, sorted paths of the unpaired files that were skipped).
  Raises:
    DataError naming the first unpaired file when `skip_unpaired` is False.
  """
  lonely_images = sorted(images[k] for k in images.keys() - labels.keys())
  lonely_labels = sorted(labels[k] for k in labels.keys() - images.keys())
  if not skip_unpaired:
    if lonely_images:
      more = f" (and {len(lonely_images) - 1} more)" if len(lonely_images) > 1 else ""
      raise DataError(f"{lonely_images[0]}: image has no label in {label_dir}{more}")
    if lonely_labels:
      more = f" (and {len(lonely_labels) - 1} more)" if len(lonely_labels) > 1 else ""
      raise DataError(f"{lonely_labels[0]}: label has no image in {image_dir}{more}")
  keys = sorted(images.keys() & labels.keys())
  examples = [Example(key=k, image_path=images[k], label_path=labels[k]) for k in keys]
  return examples, sorted(lonely_images + lonely_labels)


def identity_lut(num_classes: int, extra_ignore: Sequence[int] = (base.IGNORE_LABEL,)
                 ) -> np.ndarray:
  """[256] int32 table: 0..C-1 -> themselves, `extra_ignore` -> 255, others -1 (invalid)."""
  lut = np.full(256, -1, np.int32)
  lut[:num_classes] = np.arange(num_classes)
  for value in extra_ignore:
    lut[value] = base.IGNORE_LABEL
  return lut


def check_split_name(split: str) -> None:
  if not split or split in (".", "..") or "/" in split or os.sep in split:
    raise DataError(f"{split!r}: not a valid split name")


class PairedReader(DatasetReader):
  """A reader whose `list_examples` records unpaired files in `self.skipped`.

  Attributes:
    skip_unpaired: when True, unpaired images/labels are dropped, not errors.
    skipped: split -> sorted paths of the unpaired files dropped by the last
      `list_examples(split)` call (empty when `skip_unpaired` is False).
    lut: [V] raw label value -> train id (-1 = not allowed), used by the
      default `decode_label`.
  """

  lut: np.ndarray

  def __init__(self, root: str, *, skip_unpaired: bool = False):
    super().__init__(root)
    self.skip_unpaired = bool(skip_unpaired)
    self.skipped: dict[str, list[str]] = {}

  def _pair(self, split: str, images: Mapping[str, str], labels: Mapping[str, str],
            image_dir: str, label_dir: str) -> list[Example]:
    examples, skipped = pair_by_key(images, labels, image_dir=image_dir,
                                    label_dir=label_dir,
                                    skip_unpaired=self.skip_unpaired)
    self.skipped[split] = skipped
    return examples

  def _splits_with(self, *parents: str) -> list[str]:
    """Split names that exist as sub-folders of every folder in `parents`."""
    found = None
    for parent in parents:
      names = set()
      if os.path.isdir(parent):
        names = {n for n in os.listdir(parent)
                 if os.path.isdir(os.path.join(parent, n)) and not n.startswith(".")}
      found = names if found is None else found & names
    return sorted(found or ())

  def decode_label(self, path: str) -> np.ndarray:
    return base.map_label_values(base.load_label_png(path), self.lut, path,
                                 self.invalid_labels)


def bit_palette(num_colors: int) -> list[tuple[int, int, int]]:
  """Distinct colours by spreading the bits of the index over R, G, B (the
  scheme PASCAL VOC uses); index 0 is black."""
  colors = []
  for i in range(num_colors):
    r = g = b = 0
    c = i
    for shift in range(7, -1, -1):
      r |= ((c >> 0) & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    colors.append((r, g, b))
  return colors


def read_classes_file(path: str) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
  """Parses classes.txt (`name` or `name r g b` per line) -> (names, palette)."""
  lines = base.read_lines(path, "classes file")
  names: list[str] = []
  colors: list[tuple[int, int, int] | None] = []
  for lineno, line in enumerate(lines, 1):
    text = line.strip()
    if not text or text.startswith("#"):
      continue
    parts = text.split()
    num_trailing_ints = 0
    for part in reversed(parts[1:]):
      if not part.lstrip("-").isdigit():
        break
      num_trailing_ints += 1
    if num_trailing_ints >= 3:
      name = " ".join(parts[:-3])
      rgb = tuple(int(p) for p in parts[-3:])
      if any(not 0 <= v <= 255 for v in rgb):
        raise DataError(f"{path}:{lineno}: colour {rgb} is outside 0..255")
      colors.append(rgb)  # type: ignore[arg-type]
    elif num_trailing_ints == 2:
      raise DataError(f"{path}:{lineno}: expected `name` or `name r g b`, got {text!r}")
    else:  # A name may contain spaces and a trailing number ("level 2").
      name = text
      colors.append(None)
    if name in names:
      raise DataError(f"{path}:{lineno}: class {name!r} is listed twice")
    names.append(name)
  if not names:
    raise DataError(f"{path}: no classes listed")
  if len(names) >= base.IGNORE_LABEL:
    raise DataError(f"{path}: {len(names)} classes; at most {base.IGNORE_LABEL} fit "
                    f"next to the ignore value {base.IGNORE_LABEL}")
  fallback = bit_palette(len(names) + 1)[1:]  # Skip black.
  palette = tuple(c if c is not None else fallback[i] for i, c in enumerate(colors))
  return tuple(names), palette


class FolderReader(PairedReader):
  """Generic `<root>/{images,labels}/<split>/**` dataset with `<root>/classes.txt`.

  Args:
    root: dataset root.
    spec_name: `spec.name` (the domain's name in tables); defaults to the root
      folder's base name.
    skip_unpaired: see `PairedReader`.
  """

  def __init__(self, root: str, *, spec_name: str | None = None,
               skip_unpaired: bool = False):
    super().__init__(root, skip_unpaired=skip_unpaired)
    classes, palette = read_classes_file(os.path.join(self.root, "classes.txt"))
    self.spec = DatasetSpec(name=spec_name or os.path.basename(self.root) or "folder",
                            classes=classes, palette=palette)
    self.lut = identity_lut(len(classes))

  def splits(self) -> list[str]:
    return self._splits_with(os.path.join(self.root, "images"),
                             os.path.join(self.root, "labels"))

  def list_examples(self, split: str) -> list[Example]:
    check_split_name(split)
    image_dir = base.require_dir(os.path.join(self.root, "images", split),
                                 f"images of split {split!r}")
    label_dir = base.require_dir(os.path.join(self.root, "labels", split),
                                 f"labels of split {split!r}")
    images = index_by_key(image_dir, IMAGE_SUFFIXES, lambda rel: os.path.splitext(rel)[0])
    labels = index_by_key(label_dir, (".png",), lambda rel: os.path.splitext(rel)[0])
    return self._pair(split, images, labels, image_dir, label_dir)
