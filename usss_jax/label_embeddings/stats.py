"""Streaming statistics of the label-embedding stage: moments, PCA, class centroids.

Recipe (USSS, ICCV'19, supplementary B.1 as far as it is known): run the encoder
of a model trained on a domain's labeled images over those images, take the
per-pixel features of labeled pixels, reduce them with PCA to `d` dimensions and
summarise every class by its centroid (K=1, here) or by K k-means centroids (K>1, `kmeans`).

Everything here sees pixels as matched rows, `features [N, F]` and `labels [N]`,
and keeps memory independent of the number of images: PCA needs one streaming
pass (mean + covariance), centroids a second one (per-class sums, or for K>1 a
bounded per-class reservoir sample). Host-side NumPy, float64.

Embedding matrices are class-major: rows c*K .. c*K+K-1 belong to class c, and
there is no extra "ignore" row (see `usss_jax.losses`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp
import numpy as np

from usss_jax.data.base import IGNORE_LABEL
from usss_jax.models.drn import OUTPUT_STRIDE

_MISSING_POLICIES = ("random", "zeros", "error")
log = logging.getLogger("usss_jax")


def cell_centre_labels(labels: Any, feature_hw: tuple[int, int]) -> jnp.ndarray:
  """The labels of the pixels at the centres of the encoder's output cells.

  Args:
    labels: [..., H, W] class ids (NumPy or JAX; inside jit too).
    feature_hw: (h, w) of the encoder output, h = ceil(H / OUTPUT_STRIDE).
  Returns:
    [..., h, w] class ids; cells whose centre lies outside the image get the ignore label.
  """
  (h, w), stride = feature_hw, OUTPUT_STRIDE
  labels = jnp.asarray(labels)
  pad = [(0, 0)] * (labels.ndim - 2) + [(0, h * stride - labels.shape[-2]),
                                        (0, w * stride - labels.shape[-1])]
  padded = jnp.pad(labels, pad, constant_values=IGNORE_LABEL)
  return padded[..., stride // 2::stride, stride // 2::stride]


def as_feature_rows(features: Any, name: str = "features",
                     feature_dim: int | None = None) -> np.ndarray:
  """[N, F] float64 copy of `features`, rejecting bad shapes and non-finite values."""
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [N, F] array of pixel rows, got shape {x.shape}")
  if feature_dim is not None and x.shape[1] != feature_dim:
    raise ValueError(f"{name} has {x.shape[1]} columns, expected {feature_dim} "
                     "(same feature dimension as earlier batches)")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
  x = x.astype(np.float64, copy=False)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or Inf values")
  return x


def as_labels(labels: Any, num_rows: int, num_classes: int, ignore_label: int) -> np.ndarray:
  """[N] int64 labels; values must be in [0, num_classes) or `ignore_label`."""
  y = np.asarray(labels)
  if y.shape != (num_rows,):
    raise ValueError(f"labels must have shape ({num_rows},) to match the feature rows, "
                     f"got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {y.dtype}")
  y = y.astype(np.int64, copy=False)
  bad = (y != ignore_label) & ((y < 0) | (y >= num_classes))
  if np.any(bad):
    values = np.unique(y[bad])[:10].tolist()
    raise ValueError(f"labels contain values outside [0, {num_classes}) that are not the "
                     f"ignore label {ignore_label}: {values}")
  return y


def as_mask(mask: Any, num_rows: int) -> np.ndarray:
  m = np.asarray(mask)
  if m.shape != (num_rows,) or m.dtype != np.bool_:
    raise ValueError(f"mask must be a bool array of shape ({num_rows},), "
                     f"got {m.dtype} {m.shape}")
  return m


class StreamingMoments:
  """Count, mean and covariance of feature rows, accumulated batch by batch.

  Numerically careful in two ways (all float64):
  * rows are shifted by a fixed reference point (the first non-empty batch's
    mean) before anything is summed, so that a large common offset (features
    around 1e8 with unit spread) does not eat the significant digits of the
    batch means and their differences;
  * batches are combined with Chan et al.'s pairwise update: each batch is
    centred on its own mean before its outer products are formed, and the
    mean-difference correction is added when merging. This stores the shifted
    `mean [F]` and the centred scatter matrix
    `M2 = sum_i (x_i - mean)(x_i - mean)^T [F, F]` (the same information as
    count, sum and sum of outer products, without the cancellation of
    E[xx^T] - mean mean^T).
  Memory is O(F^2) whatever the number of rows.
  """

  def __init__(self, feature_dim: int | None = None):
    self.count = 0
    self._feature_dim = feature_dim
    self._shift: np.ndarray | None = None
    self._mean: np.ndarray | None = None  # mean of (x - shift)
    self._scatter: np.ndarray | None = None
    if feature_dim is not None:
      self._allocate(feature_dim)

  def _allocate(self, feature_dim: int) -> None:
    self._feature_dim = feature_dim
    self._shift = np.zeros((feature_dim,), np.float64)
    self._mean = np.zeros((feature_dim,), np.float64)
    self._scatter = np.zeros((feature_dim, feature_dim), np.float64)

  @property
  def feature_dim(self) -> int | None:
    return self._feature_dim

  def _combine(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
    """Adds `count` rows with shifted mean `mean` (in this object's frame) and scatter."""
    total = self.count + count
    delta = mean - self._mean
    self._scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
    self._mean += delta * (count / total)
    self.count = total

  def update(self, features: Any, mask: Any | None = None) -> "StreamingMoments":
    """Adds the rows of `features [N, F]` (only those where `mask [N]` is True)."""
    x = as_feature_rows(features, feature_dim=self._feature_dim)
    if mask is not None:
      x = x[as_mask(mask, x.shape[0])]
    if self._mean is None:
      self._allocate(x.shape[1])
    if x.shape[0] == 0:
      return self
    if self.count == 0:
      self._shift[...] = x.mean(axis=0)
    x = x - self._shift
    batch_mean = x.mean(axis=0)
    centred = x - batch_mean
    self._combine(x.shape[0], batch_mean, centred.T @ centred)
    return self

  def merge(self, other: "StreamingMoments") -> "StreamingMoments":
    """Adds the rows summarised by `other` (e.g. another worker's shard), in place."""
    if other.count == 0:
      return self
    if self._feature_dim is not None and other.feature_dim != self._feature_dim:
      raise ValueError(f"cannot merge moments of feature dim {other.feature_dim} into "
                       f"moments of feature dim {self._feature_dim}")
    if self._mean is None:
      self._allocate(other.feature_dim)
    if self.count == 0:
      self._shift[...] = other._shift
    self._combine(other.count, (other._shift - self._shift) + other._mean, other._scatter)
    return self

  @property
  def mean(self) -> np.ndarray:
    """[F] float64 mean of all rows seen."""
    if self.count == 0:
      raise ValueError("StreamingMoments has seen no rows; the mean is undefined")
    return self._shift + self._mean

  def covariance(self, ddof: int = 1) -> np.ndarray:
    """[F, F] float64 covariance: scatter / (count - ddof).

    ddof=1 (default) is the unbiased sample covariance, matching `np.cov`;
    ddof=0 the population covariance (maximum likelihood).
    """
    if self.count - ddof <= 0:
      raise ValueError(f"covariance with ddof={ddof} needs more than {ddof} rows, "
                       f"got {self.count}")
    return self._scatter / (self.count - ddof)

  @property
  def nbytes(self) -> int:
    """Bytes held by the accumulator's arrays (independent of the rows fed)."""
    return sum(a.nbytes for a in (self._shift, self._mean, self._scatter) if a is not None)


def _canonical_signs(components: np.ndarray) -> np.ndarray:
  """Flips each row so that its largest-|value| entry (first one on ties) is positive."""
  pivots = np.argmax(np.abs(components), axis=1)
  signs = np.sign(components[np.arange(components.shape[0]), pivots])
  signs[signs == 0] = 1.0
  return components * signs[:, None]


@dataclasses.dataclass(frozen=True)
class PCA:
  """A fitted PCA projection.

  Attributes:
    mean: [F] float64 feature mean.
    components: [dim, F] float64 orthonormal principal axes, by descending
      variance; each row's largest-|value| entry is positive.
    explained_variance: [dim] float64 variance along each axis (eigenvalues of
      the sample covariance, ddof=1).
  """
  mean: np.ndarray
  components: np.ndarray
  explained_variance: np.ndarray

  @property
  def dim(self) -> int:
    return self.components.shape[0]

  @property
  def feature_dim(self) -> int:
    return self.components.shape[1]

  def transform(self, x: Any) -> np.ndarray:
    """Projects `x [..., F]` to `[..., dim]` float64: (x - mean) @ components^T."""
    x = np.asarray(x, np.float64)
    if x.shape[-1:] != (self.feature_dim,):
      raise ValueError(f"PCA.transform expects [..., {self.feature_dim}] features, "
                       f"got shape {x.shape}")
    return (x - self.mean) @ self.components.T


def pca_from_moments(moments: StreamingMoments, dim: int) -> PCA:
  """Top-`dim` principal axes from streamed moments.

  Args:
    moments: accumulated over at least 2 rows.
    dim: number of components, 1 <= dim <= F.
  Returns:
    `PCA` from `eigh` of the (ddof=1) covariance, eigenvalues sorted descending,
    signs canonicalised (see `PCA`). Tiny negative eigenvalues from rounding are
    clipped to 0.
  """
  if moments.feature_dim is None or moments.count == 0:
    raise ValueError("pca_from_moments: the moments have seen no rows")
  num_features = moments.feature_dim
  if not 1 <= dim <= num_features:
    raise ValueError(f"PCA dim must be in [1, {num_features}] (the feature dimension), "
                     f"got {dim}")
  covariance = moments.covariance(ddof=1)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  order = np.argsort(-eigenvalues, kind="stable")[:dim]
  components = _canonical_signs(eigenvectors[:, order].T)
  return PCA(mean=moments.mean, components=np.ascontiguousarray(components),
             explained_variance=np.maximum(eigenvalues[order], 0.0))


def _fallback_rows(class_index: int, num_rows: int, dim: int, *, seed: int, scale: float,
                   policy: str) -> np.ndarray:
  """[num_rows, dim] stand-in prototypes for a class that had no pixels.

  "random": Gaussian directions drawn from a generator keyed by (seed, class),
  scaled to `scale` (so the result does not depend on which other classes are
  missing or on the order they are visited); "zeros": zero rows.
  """
  if policy == "zeros":
    return np.zeros((num_rows, dim), np.float64)
  rng = np.random.default_rng([seed, 3, class_index])
  rows = rng.standard_normal((num_rows, dim))
  rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
  return rows * scale


def fill_missing(per_class: list[np.ndarray | None], k: int, dim: int, *, seed: int,
                  policy: str, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
  """Stacks per-class [k, dim] blocks, filling `None` blocks by `policy`."""
  if policy not in _MISSING_POLICIES:
    raise ValueError(f"unknown missing-class policy {policy!r}; use one of {_MISSING_POLICIES}")
  missing = tuple(c for c, rows in enumerate(per_class) if rows is None)
  if missing and policy == "error":
    raise ValueError(f"{what}: classes {list(missing)} have no labeled pixels")
  present = [rows for rows in per_class if rows is not None]
  # Fallbacks get the typical norm of real prototypes, so that an EMA update or an
  # unnormalised consumer treats them like the others.
  scale = float(np.mean([np.linalg.norm(r, axis=1).mean() for r in present])) if present else 1.0
  scale = scale if scale > 0 else 1.0
  if missing:
    log.warning("%s: classes %s have no labeled pixels; using %r fallback prototypes "
                "(recorded in missing_classes)", what, list(missing), policy)
  blocks = [rows if rows is not None else
            _fallback_rows(c, k, dim, seed=seed, scale=scale, policy=policy)
            for c, rows in enumerate(per_class)]
  return np.concatenate(blocks, axis=0), missing


class StreamingClassCentroids:
  """Per-class pixel count and sum of projected features -> class means.

  Memory: `[C]` int64 counts and `[C, d]` float64 sums, whatever the rows fed.
  """

  def __init__(self, num_classes: int, dim: int):
    if num_classes < 1 or dim < 1:
      raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
    self.num_classes = num_classes
    self.dim = dim
    self.counts = np.zeros((num_classes,), np.int64)
    self.sums = np.zeros((num_classes, dim), np.float64)

  def update(self, z: Any, labels: Any, ignore_label: int = IGNORE_LABEL
             ) -> "StreamingClassCentroids":
    """Adds rows `z [N, d]` with class ids `labels [N]`; `ignore_label` rows are skipped."""
    z = as_feature_rows(z, "z", feature_dim=self.dim)
    y = as_labels(labels, z.shape[0], self.num_classes, ignore_label)
    keep = y != ignore_label
    z, y = z[keep], y[keep]
    if y.size == 0:
      return self
    # Sort-and-segment: vectorised group sums without an [N, C] one-hot.
    order = np.argsort(y, kind="stable")
    y, z = y[order], z[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(y)) + 1])
    classes = y[starts]
    self.sums[classes] += np.add.reduceat(z, starts, axis=0)
    self.counts[classes] += np.diff(np.append(starts, y.size))
    return self

  def merge(self, other: "StreamingClassCentroids") -> "StreamingClassCentroids":
    if (other.num_classes, other.dim) != (self.num_classes, self.dim):
      raise ValueError("cannot merge centroid accumulators of different shapes")
    self.counts += other.counts
    self.sums += other.sums
    return self

  @property
  def missing_classes(self) -> tuple[int, ...]:
    return tuple(int(c) for c in np.flatnonzero(self.counts == 0))

  def centroids(self, *, missing: str = "random", seed: int = 0) -> np.ndarray:
    """[C, d] float64 class means.

    A class with no pixels gets a fallback row chosen by `missing`: "random"
    (default; a deterministic Gaussian direction keyed by (seed, class), scaled
    to the mean norm of the real centroids, with a warning), "zeros", or
    "error" (ValueError naming the classes). `missing_classes` lists them.
    """
    per_class = [self.sums[c][None] / self.counts[c] if self.counts[c] else None
                 for c in range(self.num_classes)]
    rows, _ = fill_missing(per_class, 1, self.dim, seed=seed, policy=missing,
                            what="StreamingClassCentroids")
    return rows

  @property
  def nbytes(self) -> int:
    return self.counts.nbytes + self.sums.nbytes
