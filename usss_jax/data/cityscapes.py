"""Cityscapes (gtFine), 19 train ids.

Layout: `leftImg8bit/<split>/<city>/<frame>_leftImg8bit.png` with
`gtFine/<split>/<city>/<frame>_gtFine_labelIds.png` (official, 34 label ids) or
`<frame>_gtFine_labelTrainIds.png` (made by cityscapesScripts'
createTrainIdLabelImgs). Key: `<city>/<frame>`, e.g. `aachen/aachen_000000_000019`.

Label choice (`label_type`): "auto" (default) uses a frame's labelIds file when
it exists and its labelTrainIds file otherwise. labelIds are preferred because
they are the official annotation, while labelTrainIds files are generated
locally and copies in the wild are known to differ from the standard mapping
along object boundaries. "labelIds" / "labelTrainIds" use only that kind.
"""

from __future__ import annotations

import os

import numpy as np

from usss_jax.data import base
from usss_jax.data import folder
from usss_jax.data.base import DataError, DatasetSpec, Example

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
           "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
           "truck", "bus", "train", "motorcycle", "bicycle")

PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
           (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
           (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
           (0, 0, 230), (119, 11, 32))

# labelId of each trainId (cityscapesScripts helpers/labels.py); every other id
# (0-6, 9, 10, 14-16, 18, 29, 30, -1 = license plate) is ignored.
LABEL_ID_OF_TRAIN_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                        31, 32, 33)
NUM_LABEL_IDS = 34

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_TYPES = ("auto", "labelIds", "labelTrainIds")


def label_id_lut() -> np.ndarray:
  """[256] labelId -> trainId; 0..33 are valid (unlisted -> 255), and 255 too,
  because -1 (license plate) wraps to 255 when written to an 8-bit PNG."""
  lut = np.full(256, -1, np.int32)
  lut[:NUM_LABEL_IDS] = base.IGNORE_LABEL
  lut[base.IGNORE_LABEL] = base.IGNORE_LABEL
  for train_id, label_id in enumerate(LABEL_ID_OF_TRAIN_ID):
    lut[label_id] = train_id
  return lut


class CityscapesReader(folder.PairedReader):
  """Cityscapes gtFine with 19 classes.

  Args:
    root: folder holding `leftImg8bit/` and `gtFine/`.
    label_type: "auto", "labelIds" or "labelTrainIds" (see module docstring).
    skip_unpaired: drop unpaired files instead of raising (see `PairedReader`).
  """

  spec = DatasetSpec(name="cityscapes", classes=CLASSES, palette=PALETTE)

  def __init__(self, root: str, *, label_type: str = "auto", skip_unpaired: bool = False):
    super().__init__(root, skip_unpaired=skip_unpaired)
    if label_type not in LABEL_TYPES:
      raise ValueError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")
    self.label_type = label_type
    self.lut = label_id_lut()
    self.train_id_lut = folder.identity_lut(len(CLASSES))

  def splits(self) -> list[str]:
    return self._splits_with(os.path.join(self.root, "leftImg8bit"),
                             os.path.join(self.root, "gtFine"))

  def list_examples(self, split: str) -> list[Example]:
    folder.check_split_name(split)
    image_dir = base.require_dir(os.path.join(self.root, "leftImg8bit", split),
                                 f"Cityscapes images of split {split!r}")
    label_dir = base.require_dir(os.path.join(self.root, "gtFine", split),
                                 f"Cityscapes gtFine labels of split {split!r}")
    images = folder.index_by_key(image_dir, (IMAGE_SUFFIX,),
                                 lambda rel: folder.strip_suffix(rel, (IMAGE_SUFFIX,)))
    labels: dict[str, str] = {}
    if self.label_type in ("auto", "labelTrainIds"):
      labels.update(folder.index_by_key(
          label_dir, (TRAIN_IDS_SUFFIX,),
          lambda rel: folder.strip_suffix(rel, (TRAIN_IDS_SUFFIX,))))
    if self.label_type in ("auto", "labelIds"):
      # Overrides labelTrainIds of the same frame: labelIds win in "auto".
      labels.update(folder.index_by_key(
          label_dir, (LABEL_IDS_SUFFIX,),
          lambda rel: folder.strip_suffix(rel, (LABEL_IDS_SUFFIX,))))
    return self._pair(split, images, labels, image_dir, label_dir)

  def decode_label(self, path: str) -> np.ndarray:
    """labelIds -> trainIds, or checks a labelTrainIds file; chosen by file name."""
    raw = base.load_label_png(path)
    if path.endswith(TRAIN_IDS_SUFFIX):
      return base.map_label_values(raw, self.train_id_lut, path, self.invalid_labels)
    if path.endswith(LABEL_IDS_SUFFIX):
      return base.map_label_values(raw, self.lut, path, self.invalid_labels)
    raise DataError(f"{path}: not a Cityscapes label file (expected a name ending in "
                    f"{LABEL_IDS_SUFFIX} or {TRAIN_IDS_SUFFIX})")
