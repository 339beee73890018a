"""Reading TFDS `array_record` datasets prepared by `usss_jax.data.tfds_builders.prepare`.

`TfdsReader` (registry name "tfds") is a `DatasetReader` over a prepared dataset directory
whose `list_examples` / `load_example` serve its records, so splits and the input pipeline
work unchanged on prepared data. Records are found by key through the `keys.<split>.json`
files written at preparation (array_record stores them in key-hash order). Reading never
needs TensorFlow; tensorflow_datasets itself is imported on first use (it is slow to import).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from usss_jax.data.base import DataError, DatasetReader, DatasetSpec, Example

DATASET_NAME = "usss_segmentation"
DATASET_VERSION = "1.0.0"
KEYS_FILE = "keys.{split}.json"


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _as_str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def scan_keys(source) -> dict[str, list]:
  """{"keys": [...], "has_label": [...]} in record order."""
  records = [source[i] for i in range(len(source))]
  return {"keys": [_as_str(r["key"]) for r in records],
          "has_label": [bool(r["has_label"]) for r in records]}


def dataset_dir(data_dir: str, name: str, version: str = DATASET_VERSION) -> str:
  """The directory `prepare` writes config `name` of the dataset to."""
  return os.path.join(os.path.abspath(data_dir), DATASET_NAME, name, version)


class TfdsExamples:
  """Random-access view of one prepared split.

  `len`, `[i]` -> {"key", "image": [H, W, 3] uint8, "label": [H, W] uint8 (if
  labelled)} (the same dict as `reader.load_example`), `keys` and `has_label`
  (record order) and `index_of(key)`. Picklable (the data source is reopened lazily), so it
  can be a grain source with worker processes.
  """

  def __init__(self, path: str, split: str):
    self.path = os.path.abspath(path)
    self.split = split
    if not os.path.isfile(os.path.join(self.path, "dataset_info.json")):
      raise DataError(f"{self.path}: not a prepared TFDS dataset (no dataset_info.json)")
    self._source = None
    keys_path = os.path.join(self.path, KEYS_FILE.format(split=split))
    if os.path.isfile(keys_path):
      with open(keys_path) as f:
        listing = json.load(f)
    else:  # prepared elsewhere: read the keys once, skipping image decoding
      listing = scan_keys(self._open(skip_images=True))
    self.keys: list[str] = listing["keys"]
    self.has_label: list[bool] = listing["has_label"]
    self._index = {k: i for i, k in enumerate(self.keys)}

  def _open(self, skip_images: bool = False):
    tfds = _tfds()
    builder = tfds.builder_from_directory(self.path)
    if self.split not in builder.info.splits:
      raise DataError(f"{self.path}: no split {self.split!r} (have "
                      f"{sorted(builder.info.splits)})")
    decoders = None
    if skip_images:
      decoders = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
    return builder.as_data_source(self.split, decoders=decoders)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return len(self.keys)

  def index_of(self, key: str) -> int:
    try:
      return self._index[key]
    except KeyError:
      raise DataError(f"{self.path}: split {self.split!r} has no example {key!r}") from None

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._source is None:
      self._source = self._open()
    record = self._source[int(index)]
    out = {"key": _as_str(record["key"]), "image": np.asarray(record["image"])}
    if bool(record["has_label"]):
      out["label"] = np.asarray(record["label"])[..., 0]
    return out


class TfdsReader(DatasetReader):
  """A `DatasetReader` over a prepared dataset (see `prepare`).

  Examples' `image_path` is `<dataset dir>#<split>/<key>` (only for messages
  and lookup); `load_example` returns exactly what the source reader returned.
  """

  def __init__(self, path: str):
    super().__init__(path)
    try:
      with open(os.path.join(self.root, "dataset_info.json")) as f:
        json.load(f)
      builder = _tfds().builder_from_directory(self.root)
    except (OSError, ValueError) as e:
      raise DataError(f"{self.root}: not a prepared TFDS dataset ({e})") from e
    meta = builder.info.metadata or {}
    if "spec" not in meta:
      raise DataError(f"{self.root}: dataset has no usss_jax spec metadata; build it with "
                      "usss_jax.data.tfds_builders.prepare")
    s = meta["spec"]
    self.spec = DatasetSpec(name=s["name"], classes=tuple(s["classes"]),
                            palette=tuple(tuple(int(v) for v in c) for c in s["palette"]),
                            ignore_label=int(s["ignore_label"]))
    self._split_names = sorted(builder.info.splits)
    self._sources: dict[str, TfdsExamples] = {}

  def splits(self) -> list[str]:
    return list(self._split_names)

  def _examples(self, split: str) -> TfdsExamples:
    if split not in self._sources:
      if split not in self._split_names:
        raise DataError(f"{self.root}: no split {split!r} (have {self._split_names})")
      self._sources[split] = TfdsExamples(self.root, split)
    return self._sources[split]

  def list_examples(self, split: str) -> list[Example]:
    src = self._examples(split)
    out = []
    for key, has_label in sorted(zip(src.keys, src.has_label)):
      path = f"{self.root}#{split}/{key}"
      out.append(Example(key=key, image_path=path, label_path=path if has_label else None))
    return out

  def decode_label(self, path: str) -> np.ndarray:
    return self._load(path)["label"]

  def _load(self, path: str) -> dict[str, Any]:
    root, sep, rest = path.rpartition("#")
    split, _, key = rest.partition("/")
    if not sep or root != self.root:
      raise DataError(f"{path}: not an example path of {self.root}")
    src = self._examples(split)
    return src[src.index_of(key)]

  def load_example(self, ex: Example) -> dict:
    out = self._load(ex.image_path)
    if ex.label_path is None:
      out.pop("label", None)
    elif "label" not in out:
      raise DataError(f"{ex.image_path}: example has no label")
    return out
