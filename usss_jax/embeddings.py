"""Label embeddings ("prototypes") of a domain: streaming PCA + per-class centroids.

Recipe (USSS, ICCV'19, supplementary B.1 as far as it is known): run the encoder
of a model trained on a domain's labeled images over those images, take the
per-pixel features of labeled pixels, reduce them with PCA to `d` dimensions and
summarise every class by its centroid (K=1) or by K k-means centroids (K>1).

Everything here sees pixels as matched rows, `features [N, F]` and `labels [N]`
(the caller decides whether features are upsampled to label resolution or labels
downsampled to feature resolution), and keeps memory independent of the number
of images: PCA needs one streaming pass (mean + covariance), centroids a second
one (per-class sums, or for K>1 a bounded per-class reservoir sample).

Embedding matrices are class-major: rows c*K .. c*K+K-1 belong to class c, and
there is no extra "ignore" row (see `usss_jax.losses`).

Host-side statistics are NumPy float64; only `ema_update_centroids` is JAX (it
runs inside the training step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255
_FORMAT_NAME = "usss_jax.label_embeddings"
_FORMAT_VERSION = 1
_MISSING_POLICIES = ("random", "zeros", "error")


# ----------------------------------------------------------------------------------------
# Input checks shared by the accumulators.


def _as_feature_rows(features: Any, name: str = "features",
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


def _as_labels(labels: Any, num_rows: int, num_classes: int, ignore_label: int) -> np.ndarray:
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


def _as_mask(mask: Any, num_rows: int) -> np.ndarray:
  m = np.asarray(mask)
  if m.shape != (num_rows,) or m.dtype != np.bool_:
    raise ValueError(f"mask must be a bool array of shape ({num_rows},), "
                     f"got {m.dtype} {m.shape}")
  return m


# ----------------------------------------------------------------------------------------
# 1. Streaming mean and covariance.


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
    x = _as_feature_rows(features, feature_dim=self._feature_dim)
    if mask is not None:
      x = x[_as_mask(mask, x.shape[0])]
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


# ----------------------------------------------------------------------------------------
# 2. PCA.


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


# ----------------------------------------------------------------------------------------
# Missing classes.


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


def _fill_missing(per_class: list[np.ndarray | None], k: int, dim: int, *, seed: int,
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
    warnings.warn(f"{what}: classes {list(missing)} have no labeled pixels; using "
                  f"{policy!r} fallback prototypes (recorded in missing_classes)")
  blocks = [rows if rows is not None else
            _fallback_rows(c, k, dim, seed=seed, scale=scale, policy=policy)
            for c, rows in enumerate(per_class)]
  return np.concatenate(blocks, axis=0), missing


# ----------------------------------------------------------------------------------------
# 3. K = 1: streaming class centroids.


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
    z = _as_feature_rows(z, "z", feature_dim=self.dim)
    y = _as_labels(labels, z.shape[0], self.num_classes, ignore_label)
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
    rows, _ = _fill_missing(per_class, 1, self.dim, seed=seed, policy=missing,
                            what="StreamingClassCentroids")
    return rows

  @property
  def nbytes(self) -> int:
    return self.counts.nbytes + self.sums.nbytes


# ----------------------------------------------------------------------------------------
# 4. K > 1: bounded reservoir + k-means.


def _squared_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """[n, k] squared Euclidean distances, clipped at 0 against rounding."""
  d2 = (np.sum(x * x, axis=1)[:, None] - 2.0 * (x @ centres.T)
        + np.sum(centres * centres, axis=1)[None, :])
  return np.maximum(d2, 0.0)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding; needs at least k distinct rows in `x`."""
  centres = np.empty((k, x.shape[1]), np.float64)
  centres[0] = x[rng.integers(x.shape[0])]
  closest = _squared_distances(x, centres[:1])[:, 0]
  for j in range(1, k):
    total = closest.sum()
    # total > 0 since some row differs from every chosen centre (>= k distinct rows).
    index = rng.choice(x.shape[0], p=closest / total)
    centres[j] = x[index]
    closest = np.minimum(closest, _squared_distances(x, centres[j:j + 1])[:, 0])
  return centres


def _lloyd(x: np.ndarray, centres: np.ndarray, max_iters: int
           ) -> tuple[np.ndarray, np.ndarray, float]:
  """Lloyd iterations until assignments stop changing. Returns (centres, counts, inertia)."""
  k = centres.shape[0]
  assign = None
  for _ in range(max_iters):
    d2 = _squared_distances(x, centres)
    new_assign = np.argmin(d2, axis=1)
    if assign is not None and np.array_equal(new_assign, assign):
      break
    assign = new_assign
    counts = np.bincount(assign, minlength=k)
    sums = (assign[None, :] == np.arange(k)[:, None]).astype(np.float64) @ x  # [k, d]
    for j in range(k):
      if counts[j]:
        centres[j] = sums[j] / counts[j]
      else:
        # Empty cluster: restart it at the row worst served by its current centre.
        worst = int(np.argmax(d2[np.arange(x.shape[0]), assign]))
        centres[j] = x[worst]
  d2 = _squared_distances(x, centres)
  assign = np.argmin(d2, axis=1)
  counts = np.bincount(assign, minlength=k)
  return centres, counts, float(d2[np.arange(x.shape[0]), assign].sum())


def kmeans(x: Any, k: int, *, seed: int | np.random.SeedSequence | list[int] = 0,
           n_init: int = 3, max_iters: int = 100) -> np.ndarray:
  """Deterministic K-means (k-means++ seeding, Lloyd iterations) in float64 NumPy.

  Args:
    x: [n, d] rows, n >= 1.
    k: number of centroids.
    seed: anything `np.random.default_rng` accepts; same seed -> same result.
    n_init: restarts; the lowest-inertia run wins.
    max_iters: Lloyd iteration cap per restart.
  Returns:
    [k, d] float64 centroids sorted by cluster size, largest first. With fewer
    than k distinct rows the distinct rows (lexicographic order) are repeated
    cyclically to fill k rows.
  """
  x = _as_feature_rows(x, "x")
  if x.shape[0] == 0:
    raise ValueError("kmeans needs at least one row")
  if k < 1:
    raise ValueError(f"kmeans needs k >= 1, got {k}")
  distinct = np.unique(x, axis=0)
  if distinct.shape[0] <= k:
    return distinct[np.arange(k) % distinct.shape[0]]
  rng = np.random.default_rng(seed)
  best = None
  for _ in range(max(n_init, 1)):
    centres, counts, inertia = _lloyd(x, _kmeans_plus_plus(x, k, rng), max_iters)
    if best is None or inertia < best[2]:
      best = (centres, counts, inertia)
  centres, counts, _ = best
  return centres[np.argsort(-counts, kind="stable")]


class StreamingClassKMeans:
  """K prototypes per class from a bounded, uniform per-class reservoir sample.

  Each class keeps at most `max_samples_per_class` projected rows chosen by
  reservoir sampling (Vitter's algorithm R, vectorised per batch): after n rows
  of a class have been fed, every one of them is in the sample with probability
  min(1, max/n). Memory is bounded by C * max_samples_per_class * d values of
  `storage_dtype` (storage grows by doubling up to that cap), independent of the
  number of images. `centroids()` then runs seeded K-means per class.
  """

  def __init__(self, num_classes: int, dim: int, k: int, *,
               max_samples_per_class: int = 20000, seed: int = 0,
               storage_dtype: Any = np.float32):
    if num_classes < 1 or dim < 1 or k < 1 or max_samples_per_class < 1:
      raise ValueError("num_classes, dim, k and max_samples_per_class must be >= 1, got "
                       f"{num_classes}, {dim}, {k}, {max_samples_per_class}")
    self.num_classes = num_classes
    self.dim = dim
    self.k = k
    self.max_samples_per_class = max_samples_per_class
    self.seed = seed
    self.storage_dtype = np.dtype(storage_dtype)
    self.counts = np.zeros((num_classes,), np.int64)  # rows seen per class
    self._reservoirs: list[np.ndarray] = [np.empty((0, dim), self.storage_dtype)
                                          for _ in range(num_classes)]
    self._rng = np.random.default_rng([seed, 1])

  def _ensure_capacity(self, c: int, rows: int) -> None:
    current = self._reservoirs[c]
    if current.shape[0] >= rows:
      return
    capacity = min(self.max_samples_per_class, max(rows, 2 * current.shape[0], 256))
    grown = np.empty((capacity, self.dim), self.storage_dtype)
    grown[:current.shape[0]] = current
    self._reservoirs[c] = grown

  def _add_class_rows(self, c: int, rows: np.ndarray) -> None:
    cap = self.max_samples_per_class
    seen = int(self.counts[c])
    positions = seen + np.arange(rows.shape[0])  # 0-based stream index of each row
    fill = positions < cap
    if np.any(fill):
      self._ensure_capacity(c, int(positions[fill][-1]) + 1)
      self._reservoirs[c][positions[fill]] = rows[fill]
    rest = ~fill
    if np.any(rest):
      # Algorithm R: row i replaces slot j ~ U{0..i} when j < cap. Within a batch
      # a later row replacing the same slot wins, exactly as in sequential order.
      slots = self._rng.integers(0, positions[rest] + 1)
      take = slots < cap
      slots, chosen = slots[take], rows[rest][take]
      last = slots.size - 1 - np.unique(slots[::-1], return_index=True)[1]
      self._reservoirs[c][slots[last]] = chosen[last]
    self.counts[c] = seen + rows.shape[0]

  def update(self, z: Any, labels: Any, ignore_label: int = IGNORE_LABEL
             ) -> "StreamingClassKMeans":
    """Adds rows `z [N, d]` with class ids `labels [N]`; `ignore_label` rows are skipped."""
    z = _as_feature_rows(z, "z", feature_dim=self.dim)
    y = _as_labels(labels, z.shape[0], self.num_classes, ignore_label)
    for c in np.unique(y[y != ignore_label]):
      self._add_class_rows(int(c), z[y == c])
    return self

  def samples(self, class_index: int) -> np.ndarray:
    """[n_c, d] the current reservoir of a class, n_c = min(seen, max_samples_per_class)."""
    stored = min(int(self.counts[class_index]), self.max_samples_per_class)
    return self._reservoirs[class_index][:stored]

  @property
  def stored_counts(self) -> np.ndarray:
    """[C] rows currently held per class (<= max_samples_per_class)."""
    return np.minimum(self.counts, self.max_samples_per_class)

  @property
  def missing_classes(self) -> tuple[int, ...]:
    return tuple(int(c) for c in np.flatnonzero(self.counts == 0))

  def centroids(self, *, missing: str = "random", n_init: int = 3,
                max_iters: int = 100) -> np.ndarray:
    """[C*K, d] float64 prototypes, class-major (rows c*K .. c*K+K-1 = class c).

    Within a class rows are sorted by cluster size (largest first); a class with
    fewer than K distinct samples repeats them (see `kmeans`). Classes without
    pixels are handled as in `StreamingClassCentroids.centroids`.
    """
    per_class = []
    for c in range(self.num_classes):
      if self.counts[c] == 0:
        per_class.append(None)
        continue
      per_class.append(kmeans(self.samples(c), self.k, seed=[self.seed, 2, c],
                              n_init=n_init, max_iters=max_iters))
    rows, _ = _fill_missing(per_class, self.k, self.dim, seed=self.seed, policy=missing,
                            what="StreamingClassKMeans")
    return rows

  @property
  def nbytes(self) -> int:
    return self.counts.nbytes + sum(r.nbytes for r in self._reservoirs)


# ----------------------------------------------------------------------------------------
# 5. The whole stage and its file format.


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON")


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
    """Writes an `.npz` (arrays + a JSON header, no pickle) atomically: temp file + os.replace."""
    path = os.fspath(path)
    header = {"format": _FORMAT_NAME, "version": _FORMAT_VERSION,
              "num_classes": self.num_classes, "k": self.k,
              "missing_classes": list(self.missing_classes), "source": self.source,
              "metadata": self.metadata}
    arrays = {"embeddings": self.embeddings,
              "header_json": np.frombuffer(
                  json.dumps(header, default=_json_default).encode("utf-8"), np.uint8)}
    for name in ("pca_mean", "pca_components", "pca_explained_variance", "class_pixel_counts"):
      value = getattr(self, name)
      if value is not None:
        arrays[name] = np.asarray(value)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-label-emb-", suffix=".npz")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp_path, path)
    except BaseException:
      if os.path.exists(tmp_path):
        os.remove(tmp_path)
      raise

  @classmethod
  def load(cls, path: str | os.PathLike) -> "LabelEmbeddings":
    """Reads a file written by `save`; errors name the file and the problem."""
    path = os.fspath(path)
    try:
      data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
      raise
    except Exception as e:
      raise ValueError(f"{path}: cannot read as a label-embeddings .npz ({e})") from e
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
    try:
      loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
      raise
    except Exception as e:
      raise ValueError(f"{path}: cannot read ({e})") from e
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


BatchesFn = Callable[[], Iterable[tuple[Any, Any]]]


def compute_label_embeddings(batches_fn: BatchesFn, *, num_classes: int, dim: int, k: int = 1,
                             ignore_label: int = IGNORE_LABEL, seed: int = 0,
                             max_samples_per_class: int = 20000, missing: str = "random",
                             kmeans_n_init: int = 3) -> LabelEmbeddings:
  """PCA + per-class centroid (K=1) or K-means (K>1) label embeddings, in two streaming passes.

  Args:
    batches_fn: zero-argument factory returning a fresh iterable of
      `(features [N, F], labels [N])` pixel rows (NumPy or JAX arrays). It is
      called twice (PCA pass, centroid pass) and must yield the same data both
      times, e.g. deterministic, unaugmented labeled images.
    num_classes: C; labels in [0, C) or `ignore_label`.
    dim: PCA / embedding dimension d.
    k: prototypes per class.
    ignore_label: pixels with this label are left out of both passes.
    seed: seeds the reservoir, K-means and fallback prototypes.
    max_samples_per_class: reservoir cap per class for K>1 (rows are stored as
      float32: at most C * max_samples_per_class * d * 4 bytes).
    missing: policy for classes without pixels ("random", "zeros", "error").
    kmeans_n_init: K-means restarts per class.
  Returns:
    `LabelEmbeddings` with [C*K, d] float32 embeddings in PCA coordinates.
  """
  if not callable(batches_fn):
    raise TypeError("batches_fn must be a zero-argument callable returning a fresh iterable "
                    f"of (features, labels) batches, got {type(batches_fn).__name__}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")

  moments = StreamingMoments()
  for features, labels in batches_fn():
    x = _as_feature_rows(features, feature_dim=moments.feature_dim)
    y = _as_labels(labels, x.shape[0], num_classes, ignore_label)
    moments.update(x, mask=y != ignore_label)
  if moments.count < 2:
    raise ValueError(f"compute_label_embeddings: need at least 2 labeled pixels for PCA, got "
                     f"{moments.count} (did batches_fn yield any non-ignored rows?)")
  pca = pca_from_moments(moments, dim)

  if k == 1:
    accumulator = StreamingClassCentroids(num_classes, dim)
  else:
    accumulator = StreamingClassKMeans(num_classes, dim, k,
                                       max_samples_per_class=max_samples_per_class, seed=seed)
  for features, labels in batches_fn():
    x = _as_feature_rows(features, feature_dim=moments.feature_dim)
    y = _as_labels(labels, x.shape[0], num_classes, ignore_label)
    keep = y != ignore_label
    accumulator.update(pca.transform(x[keep]), y[keep], ignore_label=ignore_label)
  second_count = int(accumulator.counts.sum())
  if second_count == 0:
    raise ValueError("compute_label_embeddings: the second call of batches_fn yielded no "
                     "labeled pixels; pass a factory that returns a fresh iterable each call "
                     "(not a generator object)")
  if second_count != moments.count:
    warnings.warn(f"compute_label_embeddings: the PCA pass saw {moments.count} labeled pixels "
                  f"but the centroid pass {second_count}; batches_fn is not deterministic")

  if k == 1:
    rows = accumulator.centroids(missing=missing, seed=seed)
  else:
    rows = accumulator.centroids(missing=missing, n_init=kmeans_n_init)
  total_variance = float(np.trace(moments.covariance(ddof=1)))
  metadata = {
      "dim": dim, "feature_dim": moments.feature_dim, "k": k, "seed": seed,
      "ignore_label": ignore_label, "labeled_pixels": moments.count,
      "max_samples_per_class": max_samples_per_class if k > 1 else None,
      "explained_variance_ratio": (float(pca.explained_variance.sum() / total_variance)
                                   if total_variance > 0 else None),
      "missing_policy": missing,
  }
  return LabelEmbeddings(
      embeddings=rows.astype(np.float32), num_classes=num_classes, k=k,
      pca_mean=pca.mean, pca_components=pca.components,
      pca_explained_variance=pca.explained_variance,
      class_pixel_counts=accumulator.counts.copy(),
      missing_classes=accumulator.missing_classes,
      source="pca_centroids" if k == 1 else "pca_kmeans", metadata=metadata)


# ----------------------------------------------------------------------------------------
# 6. EMA update of the centroids during training.


def ema_update_centroids(embeddings: jax.Array, pixel_emb: jax.Array, assign_labels: jax.Array,
                         valid: jax.Array, theta: float | jax.Array, k: int = 1) -> jax.Array:
  """Moves each prototype towards the batch mean of the pixels assigned to it.

  new_row = theta * old_row + (1 - theta) * mean(pixels assigned to the row) for
  rows that received pixels; other rows are unchanged. With K=1 a pixel belongs
  to the row of its label; with K>1 to the Euclidean-nearest of its class's K
  rows. Pure and jit-able (k must be static); gradients do not flow into it.

  Args:
    embeddings: [M, d] class-major prototypes, M = C * k.
    pixel_emb: [N, d] (or [..., d]) pixel embeddings.
    assign_labels: [N] (or [...]) class ids; out-of-range ids (e.g. 255) are skipped.
    valid: [N] (or [...]) bool, pixels that may update.
    theta: momentum in [0, 1]; 1 keeps the old prototypes.
    k: prototypes per class (static).
  Returns:
    [M, d] updated prototypes, dtype of `embeddings`.
  """
  num_rows, dim = embeddings.shape
  if num_rows % k:
    raise ValueError(f"embeddings has {num_rows} rows, not a multiple of k={k}")
  num_classes = num_rows // k
  x = jax.lax.stop_gradient(pixel_emb.reshape(-1, dim).astype(jnp.float32))
  labels = assign_labels.reshape(-1).astype(jnp.int32)
  valid = valid.reshape(-1) & (labels >= 0) & (labels < num_classes)
  old = jax.lax.stop_gradient(embeddings.astype(jnp.float32))
  safe_labels = jnp.where(valid, labels, 0)
  if k == 1:
    rows = safe_labels
  else:
    # argmin_j |x - c_j|^2 = argmin_j |c_j|^2 - 2 x.c_j over the K rows of the pixel's class.
    scores = (jnp.sum(old * old, axis=1)[None, :]
              - 2.0 * jnp.dot(x, old.T, precision=jax.lax.Precision.HIGHEST))  # [N, M]
    own_class = (jnp.arange(num_rows) // k)[None, :] == safe_labels[:, None]
    rows = jnp.argmin(jnp.where(own_class, scores, jnp.inf), axis=1)
  weights = valid.astype(jnp.float32)
  sums = jax.ops.segment_sum(x * weights[:, None], rows, num_segments=num_rows)
  counts = jax.ops.segment_sum(weights, rows, num_segments=num_rows)
  batch_mean = sums / jnp.maximum(counts, 1.0)[:, None]
  theta = jnp.asarray(theta, jnp.float32)
  new = jnp.where(counts[:, None] > 0, theta * old + (1.0 - theta) * batch_mean, old)
  return new.astype(embeddings.dtype)
