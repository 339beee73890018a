"""Label embeddings ("prototypes"): the maths, independent of how a model is trained.

stats (streaming moments, PCA, class centroids, labels at the encoder's cells), kmeans (K > 1
prototypes per class), store (the .npz file format), ema (prototypes that follow the model
during training), and `compute_label_embeddings` (PCA + centroids in two streaming passes).
The stage that trains the models they come from is `usss_jax.label_embedding_stage`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from usss_jax.data.base import IGNORE_LABEL
from usss_jax.label_embeddings.kmeans import StreamingClassKMeans
from usss_jax.label_embeddings.stats import (StreamingClassCentroids, StreamingMoments,
                                             as_feature_rows, as_labels, pca_from_moments)
from usss_jax.label_embeddings.store import LabelEmbeddings

# config.label_embeddings.source: where a run's label embeddings come from.
SOURCES = ("pretrain", "joint", "file", "random")
log = logging.getLogger("usss_jax")

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
  return compute_joint_label_embeddings(
      [batches_fn], num_classes=[num_classes], dim=dim, k=k, ignore_label=ignore_label,
      seed=seed, max_samples_per_class=max_samples_per_class, missing=missing,
      kmeans_n_init=kmeans_n_init)[0]


def compute_joint_label_embeddings(batches_fns: Sequence[BatchesFn], *, num_classes: Sequence[int],
                                   dim: int, k: int = 1, ignore_label: int = IGNORE_LABEL,
                                   seed: int = 0, max_samples_per_class: int = 20000,
                                   missing: str = "random",
                                   kmeans_n_init: int = 3) -> list[LabelEmbeddings]:
  """`compute_label_embeddings` of several domains in *one* basis: the PCA is fitted on the
  pixels of every domain together, then each domain's centroids are taken in it.

  Args:
    batches_fns: per domain, a `batches_fn` of pixel rows of one model's features (the same
      encoder for every domain, so that the rows share their coordinates).
    num_classes: per domain, C.
    dim, k, ignore_label, seed, max_samples_per_class, missing, kmeans_n_init: as
      `compute_label_embeddings`.
  Returns:
    Per domain `LabelEmbeddings` whose pca_mean / pca_components are the shared basis.
  """
  for fn in batches_fns:
    if not callable(fn):
      raise TypeError("batches_fn must be a zero-argument callable returning a fresh iterable "
                      f"of (features, labels) batches, got {type(fn).__name__}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")

  moments = StreamingMoments()
  for fn, classes in zip(batches_fns, num_classes):
    for features, labels in fn():
      x = as_feature_rows(features, feature_dim=moments.feature_dim)
      y = as_labels(labels, x.shape[0], classes, ignore_label)
      moments.update(x, mask=y != ignore_label)
  if moments.count < 2:
    raise ValueError(f"compute_label_embeddings: need at least 2 labeled pixels for PCA, got "
                     f"{moments.count} (did batches_fn yield any non-ignored rows?)")
  pca = pca_from_moments(moments, dim)
  total_variance = float(np.trace(moments.covariance(ddof=1)))
  out, second_count = [], 0
  for fn, classes in zip(batches_fns, num_classes):
    if k == 1:
      accumulator = StreamingClassCentroids(classes, dim)
    else:
      accumulator = StreamingClassKMeans(classes, dim, k,
                                         max_samples_per_class=max_samples_per_class, seed=seed)
    for features, labels in fn():
      x = as_feature_rows(features, feature_dim=moments.feature_dim)
      y = as_labels(labels, x.shape[0], classes, ignore_label)
      keep = y != ignore_label
      accumulator.update(pca.transform(x[keep]), y[keep], ignore_label=ignore_label)
    count = int(accumulator.counts.sum())
    if count == 0:
      raise ValueError("compute_label_embeddings: the second call of batches_fn yielded no "
                       "labeled pixels; pass a factory that returns a fresh iterable each call "
                       "(not a generator object)")
    second_count += count
    if k == 1:
      rows = accumulator.centroids(missing=missing, seed=seed)
    else:
      rows = accumulator.centroids(missing=missing, n_init=kmeans_n_init)
    metadata = {
        "dim": dim, "feature_dim": moments.feature_dim, "k": k, "seed": seed,
        "ignore_label": ignore_label, "labeled_pixels": count,
        "basis_pixels": moments.count, "basis_domains": len(batches_fns),
        "max_samples_per_class": max_samples_per_class if k > 1 else None,
        "explained_variance_ratio": (float(pca.explained_variance.sum() / total_variance)
                                     if total_variance > 0 else None),
        "missing_policy": missing,
    }
    out.append(LabelEmbeddings(
        embeddings=rows.astype(np.float32), num_classes=classes, k=k,
        pca_mean=pca.mean, pca_components=pca.components,
        pca_explained_variance=pca.explained_variance,
        class_pixel_counts=accumulator.counts.copy(),
        missing_classes=accumulator.missing_classes,
        source="pca_centroids" if k == 1 else "pca_kmeans", metadata=metadata))
  if second_count != moments.count:
    log.warning("compute_label_embeddings: the PCA pass saw %d labeled pixels but the centroid "
                "pass %d; batches_fn is not deterministic", moments.count, second_count)
  return out
