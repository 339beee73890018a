"""SUN RGB-D: 37 classes (`sunrgbd`) and the 13-class NYUv2 grouping (`sunrgbd13`).

Layout (mseg's): `image/<split>/img-000001.jpg` with `<label_dir>/<split>/00000001.png`,
paired by the frame number (key: the number as 8 digits, e.g. `00000001`).

Label encodings (`label_encoding`):
  "label37" (default, folder `semseg-label37`): 0 = wall ... 36 = bag, 255 = void.
  "label38" (folder `semseg-label38`): the original SUN RGB-D numbering,
    0 = void, 1..37 = classes; shifted down by one on decoding.
`label_dir` overrides the folder name.

The 13-class version groups the 37 classes like the standard NYUv2-40 -> 13
mapping (Couprie et al. 2013; the `class13Mapping` of the nyuv2-meta-data
repository), whose first 37 classes are exactly SUN RGB-D's:

  13-class id  name       37-class members
   0           bed        bed
   1           books      books
   2           ceiling    ceiling
   3           chair      chair
   4           floor      floor, floor mat
   5           furniture  cabinet, bookshelf, counter, shelves, dresser,
                          refrigerator, night stand
   6           objects    pillow, mirror, clothes, paper, towel, shower curtain,
                          box, whiteboard, person, toilet, sink, lamp, bathtub, bag
   7           painting   picture
   8           sofa       sofa
   9           table      table, desk
  10           tv         television
  11           wall       wall, door
  12           window     window, blinds, curtain
"""

from __future__ import annotations

import os
import re

import numpy as np

from usss_jax.data import base
from usss_jax.data import folder
from usss_jax.data.base import DatasetSpec, Example

CLASSES37 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
    "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refrigerator",
    "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
    "night stand", "toilet", "sink", "lamp", "bathtub", "bag")

PALETTE37 = tuple(folder.bit_palette(len(CLASSES37) + 1)[1:])

CLASSES13 = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
             "painting", "sofa", "table", "tv", "wall", "window")

PALETTE13 = ((0, 0, 255), (232, 88, 47), (0, 217, 0), (148, 0, 240), (222, 241, 23),
             (255, 205, 205), (0, 223, 228), (106, 135, 204), (116, 28, 41),
             (240, 35, 235), (0, 166, 156), (249, 139, 0), (225, 228, 194))

# 37-class id -> 13-class id (table in the module docstring).
CLASS13_OF_CLASS37 = (11, 4, 5, 0, 3, 8, 9, 11, 12, 5, 7, 5, 12, 9, 5, 12, 5, 6, 6, 4,
                      6, 2, 1, 5, 10, 6, 6, 6, 6, 6, 6, 5, 6, 6, 6, 6, 6)

LABEL_ENCODINGS = {"label37": "semseg-label37", "label38": "semseg-label38"}

_IMAGE_NUMBER = re.compile(r"^(?:img-)?(\d+)$")
_LABEL_NUMBER = re.compile(r"^(\d+)$")


def _number_key(pattern: re.Pattern, rel: str) -> str | None:
  """`img-000001.jpg` / `00000001.png` -> `00000001`; other names are not frames."""
  if "/" in rel:
    return None  # Frames sit directly in the split folder.
  match = pattern.match(os.path.splitext(rel)[0])
  return f"{int(match.group(1)):08d}" if match else None


class SUNRGBDReader(folder.PairedReader):
  """SUN RGB-D with 37 classes.

  Args:
    root: folder holding `image/` and the label folder.
    label_encoding: "label37" or "label38" (see module docstring).
    label_dir: label folder name; default depends on `label_encoding`.
    skip_unpaired: drop unpaired files instead of raising.
  """

  spec = DatasetSpec(name="sunrgbd", classes=CLASSES37, palette=PALETTE37)

  def __init__(self, root: str, *, label_encoding: str = "label37",
               label_dir: str | None = None, skip_unpaired: bool = False):
    super().__init__(root, skip_unpaired=skip_unpaired)
    if label_encoding not in LABEL_ENCODINGS:
      raise ValueError(f"label_encoding must be one of {sorted(LABEL_ENCODINGS)}, "
                       f"got {label_encoding!r}")
    self.label_encoding = label_encoding
    self.label_dir = label_dir or LABEL_ENCODINGS[label_encoding]
    if label_encoding == "label37":
      lut37 = folder.identity_lut(len(CLASSES37))
    else:  # 0 = void, 1..37 -> 0..36; 255 does not occur in this encoding.
      lut37 = np.full(256, -1, np.int32)
      lut37[0] = base.IGNORE_LABEL
      lut37[1:len(CLASSES37) + 1] = np.arange(len(CLASSES37))
    self.lut = self._compose(lut37)

  def _compose(self, lut37: np.ndarray) -> np.ndarray:
    """Raw value -> this reader's train ids, given raw value -> 37-class id."""
    return lut37

  def splits(self) -> list[str]:
    return self._splits_with(os.path.join(self.root, "image"),
                             os.path.join(self.root, self.label_dir))

  def list_examples(self, split: str) -> list[Example]:
    folder.check_split_name(split)
    image_dir = base.require_dir(os.path.join(self.root, "image", split),
                                 f"SUN RGB-D images of split {split!r}")
    label_dir = base.require_dir(os.path.join(self.root, self.label_dir, split),
                                 f"SUN RGB-D labels of split {split!r}")
    images = folder.index_by_key(image_dir, (".jpg", ".jpeg", ".png"),
                                 lambda rel: _number_key(_IMAGE_NUMBER, rel))
    labels = folder.index_by_key(label_dir, (".png",),
                                 lambda rel: _number_key(_LABEL_NUMBER, rel))
    return self._pair(split, images, labels, image_dir, label_dir)


class SUNRGBD13Reader(SUNRGBDReader):
  """SUN RGB-D grouped into the 13 NYUv2 categories (same options as 37 classes)."""

  spec = DatasetSpec(name="sunrgbd13", classes=CLASSES13, palette=PALETTE13)

  def _compose(self, lut37: np.ndarray) -> np.ndarray:
    table = np.asarray(CLASS13_OF_CLASS37 + (base.IGNORE_LABEL,), np.int32)
    # -1 (invalid) stays -1; 255 (void) indexes the appended ignore entry.
    lut = np.where(lut37 < 0, -1,
                   table[np.where(lut37 == base.IGNORE_LABEL, len(CLASSES37), lut37)])
    return lut.astype(np.int32)
