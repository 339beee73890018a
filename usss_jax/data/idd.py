"""India Driving Dataset: IDD level-3 (26 classes) and IDD-Lite (7 level-1 classes).

IDD (`idd`): `leftImg8bit/<split>/<seq>/<frame>_leftImg8bit.png` with
`gtFine/<split>/<seq>/<frame>_gtFine_labellevel3Ids.png`, made by the AutoNUE
public-code label generation at level 3: values 0..25, 255 = void.

IDD-Lite (`idd_lite`): `leftImg8bit/<split>/<seq>/<frame>_image.jpg` with
`gtFine/<split>/<seq>/<frame>_label.png`: level-1 values 0..6, 255 = void.

Key: `<seq>/<frame>`.
"""

from __future__ import annotations

import os

from usss_jax.data import base
from usss_jax.data import folder
from usss_jax.data.base import DatasetSpec, Example

# Level-3 ids of AutoNUE helpers/anue_labels.py; the name lists what each id
# absorbs from the finer levels.
LEVEL3_CLASSES = (
    "road", "drivable fallback", "sidewalk", "non-drivable fallback", "person",
    "rider", "motorcycle", "bicycle", "autorickshaw", "car", "truck", "bus",
    "vehicle fallback", "curb", "wall", "fence", "guard rail", "billboard",
    "traffic sign", "traffic light", "pole", "obs-str-bar-fallback", "building",
    "bridge", "vegetation", "sky")

LEVEL3_PALETTE = (
    (128, 64, 128), (250, 170, 160), (244, 35, 232), (152, 251, 152), (220, 20, 60),
    (255, 0, 0), (0, 0, 230), (119, 11, 32), (255, 204, 54), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (136, 143, 153), (220, 190, 40), (102, 102, 156), (190, 153, 153),
    (180, 165, 180), (174, 64, 67), (220, 220, 0), (250, 170, 30), (153, 153, 153),
    (169, 187, 214), (70, 70, 70), (150, 100, 100), (107, 142, 35), (70, 130, 180))

LITE_CLASSES = ("drivable", "non-drivable", "living things", "vehicles",
                "roadside objects", "far objects", "sky")

LITE_PALETTE = ((128, 64, 128), (244, 35, 232), (220, 20, 60), (0, 0, 142),
                (190, 153, 153), (70, 70, 70), (70, 130, 180))


class _IDDBase(folder.PairedReader):
  """`leftImg8bit/<split>/**<image_suffix>` paired with `gtFine/<split>/**<label_suffix>`."""

  image_suffix: str
  label_suffix: str

  def __init__(self, root: str, *, skip_unpaired: bool = False):
    super().__init__(root, skip_unpaired=skip_unpaired)
    self.lut = folder.identity_lut(self.spec.num_classes)

  def splits(self) -> list[str]:
    return self._splits_with(os.path.join(self.root, "leftImg8bit"),
                             os.path.join(self.root, "gtFine"))

  def list_examples(self, split: str) -> list[Example]:
    folder.check_split_name(split)
    name = self.spec.name
    image_dir = base.require_dir(os.path.join(self.root, "leftImg8bit", split),
                                 f"{name} images of split {split!r}")
    label_dir = base.require_dir(os.path.join(self.root, "gtFine", split),
                                 f"{name} labels of split {split!r}")
    images = folder.index_by_key(
        image_dir, (self.image_suffix,),
        lambda rel: folder.strip_suffix(rel, (self.image_suffix,)))
    labels = folder.index_by_key(
        label_dir, (self.label_suffix,),
        lambda rel: folder.strip_suffix(rel, (self.label_suffix,)))
    return self._pair(split, images, labels, image_dir, label_dir)


class IDDReader(_IDDBase):
  """IDD with level-3 labels (26 classes).

  Args:
    root: folder holding `leftImg8bit/` and `gtFine/`.
    skip_unpaired: drop unpaired files instead of raising.
  """

  spec = DatasetSpec(name="idd", classes=LEVEL3_CLASSES, palette=LEVEL3_PALETTE)
  image_suffix = "_leftImg8bit.png"
  label_suffix = "_gtFine_labellevel3Ids.png"


class IDDLiteReader(_IDDBase):
  """IDD-Lite with level-1 labels (7 classes).

  Args:
    root: the `idd20k_lite` folder holding `leftImg8bit/` and `gtFine/`.
    skip_unpaired: drop unpaired files instead of raising.
  """

  spec = DatasetSpec(name="idd_lite", classes=LITE_CLASSES, palette=LITE_PALETTE)
  image_suffix = "_image.jpg"
  label_suffix = "_label.png"
