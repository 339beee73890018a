"""Dataset name -> reader class."""

from __future__ import annotations

import inspect

from usss_jax.data.base import DatasetReader
from usss_jax.data.camvid import CamVidReader
from usss_jax.data.cityscapes import CityscapesReader
from usss_jax.data.folder import FolderReader
from usss_jax.data.idd import IDDLiteReader, IDDReader
from usss_jax.data.sunrgbd import SUNRGBD13Reader, SUNRGBDReader
from usss_jax.data.tfds_reader import TfdsReader

READERS: dict[str, type[DatasetReader]] = {
    "camvid": CamVidReader,
    "cityscapes": CityscapesReader,
    "folder": FolderReader,
    "idd": IDDReader,
    "idd_lite": IDDLiteReader,
    "sunrgbd": SUNRGBDReader,
    "sunrgbd13": SUNRGBD13Reader,
    # A dataset prepared by usss_jax.data.tfds_builders.prepare; root = its directory.
    "tfds": TfdsReader,
}


def get_reader(name: str, root: str, **kwargs) -> DatasetReader:
  """Builds the reader registered as `name` for the dataset at `root`.

  Raises:
    ValueError: unknown name, or an option the reader does not take.
    DataError: `root` is missing or malformed.
  """
  try:
    cls = READERS[name]
  except KeyError:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(READERS))}"
                     ) from None
  params = inspect.signature(cls.__init__).parameters
  options = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ValueError(f"dataset {name!r} takes no option(s) {unknown}; "
                     f"its options: {options}")
  return cls(root, **kwargs)
