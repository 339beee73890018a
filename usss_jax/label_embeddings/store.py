"""The label-embedding file format and the non-learned sources (external files, random).

`LabelEmbeddings` is what the stage writes per domain, `<workdir>/label_embeddings/<domain>.npz`:
the [C*K, d] matrix, how it was made (PCA statistics, pixel counts, source) and a JSON header,
without pickle. `from_external` reads user-given vectors (e.g. word embeddings).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from usss_jax import files

_FORMAT_NAME = "usss_jax.label_embeddings"
_FORMAT_VERSION = 1


def _np_load(path: str, what: str = ""):
  """`np.load` without pickle; a file that is there but unreadable is a ValueError naming it."""
  try:
    return np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(f"{path}: cannot read{' ' + what if what else ''} ({e})") from e


@dataclasses.dataclass
class LabelEmbeddings:
  """A domain's fixed label embeddings and how they were made.

  Attributes:
    embeddings: [C*K, d] float32, class-major.
    num_classes: C.
    k: prototypes per class, K.
    pca_mean: [F] float64 feature mean of the PCA (None for external embeddings).
    pca_components: [d, F] float64 PCA axes (None for external embeddings).
    pca_explained_variance: [d] float64 (None for external embeddings).
    class_pixel_counts: [C] int64 labeled pixels per class (None if unknown).
    missing_classes: classes without pixels, which got fallback prototypes.
    source: where the embeddings come from, e.g. "pca_centroids" or "external:<path>".
    metadata: JSON-serialisable details (dims, seed, pixel totals, ...).
  """
  embeddings: np.ndarray
  num_classes: int
  k: int = 1
  pca_mean: np.ndarray | None = None
  pca_components: np.ndarray | None = None
  pca_explained_variance: np.ndarray | None = None
  class_pixel_counts: np.ndarray | None = None
  missing_classes: tuple[int, ...] = ()
  source: str = ""
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.embeddings = np.asarray(self.embeddings, np.float32)
    self.num_classes, self.k = int(self.num_classes), int(self.k)
    self.missing_classes = tuple(int(c) for c in self.missing_classes)
    if self.embeddings.ndim != 2 or self.embeddings.shape[0] != self.num_classes * self.k:
      raise ValueError(f"embeddings must have shape [num_classes*k, d] = "
                       f"[{self.num_classes * self.k}, d], got {self.embeddings.shape}")

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]

  def save(self, path: str | os.PathLike) -> None:
    """Writes an `.npz` (arrays + a JSON header, no pickle) atomically (`files.atomic_write`)."""
    path = os.fspath(path)
    header = {"format": _FORMAT_NAME, "version": _FORMAT_VERSION,
              "num_classes": self.num_classes, "k": self.k,
              "missing_classes": list(self.missing_classes), "source": self.source,
              "metadata": self.metadata}
    arrays = {"embeddings": self.embeddings,
              "header_json": np.frombuffer(
                  json.dumps(files.to_json(header, "metadata")).encode("utf-8"), np.uint8)}
    for name in ("pca_mean", "pca_components", "pca_explained_variance", "class_pixel_counts"):
      value = getattr(self, name)
      if value is not None:
        arrays[name] = np.asarray(value)
    with files.atomic_write(path, "wb") as f:
      np.savez(f, **arrays)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "LabelEmbeddings":
    """Reads a file written by `save`; errors name the file and the problem."""
    path = os.fspath(path)
    data = _np_load(path, "as a label-embeddings .npz")
    with data:
      if not hasattr(data, "files") or "header_json" not in data.files:
        raise ValueError(f"{path}: not a label-embeddings file written by "
                         "LabelEmbeddings.save (no 'header_json' entry)")
      try:
        header = json.loads(bytes(data["header_json"]).decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt JSON header ({e})") from e
      if header.get("format") != _FORMAT_NAME or header.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {header.get('format')!r} "
                         f"version {header.get('version')!r}")
      if "embeddings" not in data.files:
        raise ValueError(f"{path}: no 'embeddings' array")
      optional = {name: (data[name] if name in data.files else None)
                  for name in ("pca_mean", "pca_components", "pca_explained_variance",
                               "class_pixel_counts")}
      try:
        return cls(embeddings=data["embeddings"], num_classes=header["num_classes"],
                   k=header["k"], missing_classes=tuple(header["missing_classes"]),
                   source=header["source"], metadata=header["metadata"], **optional)
      except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: invalid label-embeddings file ({e!r})") from e

  @classmethod
  def from_external(cls, path: str | os.PathLike, num_classes: int, k: int, dim: int
                    ) -> "LabelEmbeddings":
    """User-given embeddings (e.g. word vectors) from `.npy` or `.npz`.

    An `.npz` may be a `save` file, hold an 'embeddings' array, or hold exactly
    one array. The matrix must be [num_classes*k, dim], finite, class-major.
    """
    path = os.fspath(path)
    expected = (num_classes * k, dim)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".npy", ".npz"):
      raise ValueError(f"{path}: external label embeddings must be a .npy or .npz file")
    loaded = _np_load(path)
    if isinstance(loaded, np.lib.npyio.NpzFile):
      with loaded:
        if "header_json" in loaded.files:
          array = None
        elif "embeddings" in loaded.files:
          array = loaded["embeddings"]
        elif len(loaded.files) == 1:
          array = loaded[loaded.files[0]]
        else:
          raise ValueError(f"{path}: expected an 'embeddings' array or a single array, "
                           f"found {loaded.files}")
      if array is None:
        saved = cls.load(path)
        if saved.embeddings.shape != expected or saved.k != k:
          raise ValueError(f"{path}: expected label embeddings of shape {expected} "
                           f"(num_classes={num_classes} x k={k}, dim={dim}), got "
                           f"{saved.embeddings.shape} (k={saved.k})")
        return saved
    else:
      array = loaded
    if array.shape != expected:
      raise ValueError(f"{path}: expected label embeddings of shape {expected} "
                       f"(num_classes={num_classes} x k={k}, dim={dim}), got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{path}: label embeddings must be numeric, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{path}: label embeddings contain NaN or Inf")
    return cls(embeddings=array, num_classes=num_classes, k=k, source=f"external:{path}",
               metadata={"dim": dim})


def random_embeddings(num_classes: int, k: int, dim: int, seed: int) -> np.ndarray:
  """[C*K, D] N(0, 1) rows (the reference's default)."""
  return np.random.default_rng(seed).normal(size=(num_classes * k, dim)).astype(np.float32)


def external_paths(spec: str, domain_names: Sequence[str]) -> dict[str, str]:
  """`config.label_embeddings.file`: "name=path,name=path", or one file for every domain."""
  if "=" in spec:
    pairs = dict(item.split("=", 1) for item in spec.split(",") if item)
    missing = [n for n in domain_names if n not in pairs]
    if missing:
      raise ValueError(f"config.label_embeddings.file={spec!r} names no file for {missing}")
    return pairs
  return {n: spec for n in domain_names}


def load_external(path: str, name: str, num_classes: int, k: int, dim: int) -> np.ndarray:
  """[C*K, D] float32 embeddings of domain `name`: the array `name` of an .npz holding one
  per domain, else the whole file (`LabelEmbeddings.from_external`)."""
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      if name in z.files:
        arr = np.asarray(z[name], np.float32)
        if arr.shape != (num_classes * k, dim):
          raise ValueError(f"{path}: array {name!r} has shape {arr.shape}, expected "
                           f"({num_classes * k}, {dim}) = (classes*K, embedding_dim)")
        return arr
  return np.asarray(LabelEmbeddings.from_external(path, num_classes, k, dim).embeddings,
                    np.float32)
