"""K > 1 prototypes per class: a bounded per-class reservoir sample and K-means over it."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import cluster

from usss_jax.data.base import IGNORE_LABEL
from usss_jax.label_embeddings.stats import as_feature_rows, as_labels, fill_missing


def kmeans(x: Any, k: int, *, seed: int | np.random.SeedSequence | list[int] = 0,
           n_init: int = 3, max_iters: int = 100) -> np.ndarray:
  """Deterministic K-means (scikit-learn: k-means++ seeding, Lloyd iterations), float64.

  Args:
    x: [n, d] rows, n >= 1.
    k: number of centroids.
    seed: anything `np.random.SeedSequence` accepts; same seed -> same result.
    n_init: restarts; the lowest-inertia run wins.
    max_iters: Lloyd iteration cap per restart.
  Returns:
    [k, d] float64 centroids sorted by cluster size, largest first. With fewer
    than k distinct rows the distinct rows (lexicographic order) are repeated
    cyclically to fill k rows.
  """
  x = as_feature_rows(x, "x")
  if x.shape[0] == 0:
    raise ValueError("kmeans needs at least one row")
  if k < 1:
    raise ValueError(f"kmeans needs k >= 1, got {k}")
  distinct = np.unique(x, axis=0)
  if distinct.shape[0] <= k:
    return distinct[np.arange(k) % distinct.shape[0]]
  sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
  random_state = int(sequence.generate_state(1, dtype=np.uint32)[0])
  fitted = cluster.KMeans(n_clusters=k, n_init=max(n_init, 1), max_iter=max_iters,
                          random_state=random_state).fit(x)
  counts = np.bincount(fitted.labels_, minlength=k)
  return np.asarray(fitted.cluster_centers_, np.float64)[np.argsort(-counts, kind="stable")]


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
    z = as_feature_rows(z, "z", feature_dim=self.dim)
    y = as_labels(labels, z.shape[0], self.num_classes, ignore_label)
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
    rows, _ = fill_missing(per_class, self.k, self.dim, seed=self.seed, policy=missing,
                            what="StreamingClassKMeans")
    return rows

  @property
  def nbytes(self) -> int:
    return self.counts.nbytes + sum(r.nbytes for r in self._reservoirs)
