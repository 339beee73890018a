"""The label-embedding stage (paper, supplementary B.1): where each domain's prototypes come from.

source "pretrain": train a model on the domain's labeled images alone (method "single" on
that one domain, `train.run_training`), run its encoder over those images, project the
per-pixel features with PCA to the embedding dimension and take the class centroids
(K-means for K > 1), in two streaming passes whose memory does not grow with the number of
images. Results are saved as `<workdir>/label_embeddings/<domain>.npz` and reused on resume.
source "file": user-given vectors (e.g. word embeddings) per domain.
source "random": N(0, 1) rows, as the released reference code does.

The stage calls training (for "pretrain"); training never calls the stage.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from usss_jax import inference, train, train_step
from usss_jax.data import transforms
from usss_jax.data.base import IGNORE_LABEL
from usss_jax.domains import Domain
from usss_jax.label_embeddings import store
from usss_jax.label_embeddings.kmeans import StreamingClassKMeans
from usss_jax.label_embeddings.stats import (StreamingClassCentroids, StreamingMoments,
                                             as_feature_rows, as_labels, pca_from_moments)
from usss_jax.label_embeddings.store import LabelEmbeddings


def embeddings_dir(workdir: str) -> str:
  return os.path.join(workdir, "label_embeddings")


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
    x = as_feature_rows(features, feature_dim=moments.feature_dim)
    y = as_labels(labels, x.shape[0], num_classes, ignore_label)
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
    x = as_feature_rows(features, feature_dim=moments.feature_dim)
    y = as_labels(labels, x.shape[0], num_classes, ignore_label)
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


def feature_label_batches(model, variables, domain: Domain, *, normalization: str,
                          max_pixels_per_image: int, seed: int
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (features [N, F] float32, labels [N] int32) per labeled image of `domain`.

  Images (and labels, nearest) are resized to the domain's training resize; features are
  the encoder output and labels are sampled at the centre of each 8x8 output cell (no
  feature map is upsampled, which keeps the pass cheap). At most `max_pixels_per_image`
  valid pixels per image, drawn with a seeded generator.
  """
  features_of = inference.features_fn(model)
  rng = np.random.default_rng(seed)
  for ex in domain.labeled:
    item = domain.reader.load_example(ex)
    x = transforms.eval_transform(item, resize_hw=domain.resize_hw, normalization=normalization)
    yield inference.sampled_features(features_of, variables, x["image"], x["label"],
                                     max_pixels=max_pixels_per_image, rng=rng)


def compute_from_model(model, variables, domain: Domain, *, k: int, dim: int,
                       normalization: str, max_pixels_per_image: int,
                       seed: int) -> LabelEmbeddings:
  """Streaming PCA + centroids over a trained model's encoder features of `domain`."""
  def batches_fn():
    return feature_label_batches(model, variables, domain, normalization=normalization,
                                 max_pixels_per_image=max_pixels_per_image, seed=seed)
  return compute_label_embeddings(batches_fn, num_classes=domain.num_classes, dim=dim, k=k,
                                  seed=seed)


def compute_for_domain(config: ml_collections.ConfigDict, model, variables,
                       domain: Domain) -> LabelEmbeddings:
  """A domain's label embeddings from a trained model, with the config's stage settings."""
  return compute_from_model(
      model, variables, domain, k=int(config.embeddings_per_class),
      dim=int(config.embedding_dim), normalization=config.normalization,
      max_pixels_per_image=int(config.label_embeddings.max_pixels_per_image), seed=config.seed)


def pretrain_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The supervised single-domain run whose encoder defines `name`'s embeddings."""
  sub = copy.deepcopy(config)
  sub.unlock()
  sub.domain_names = (name,)
  sub.method = "single"
  sub.single_domain = name
  sub.total_steps = int(config.label_embeddings.pretrain_steps)
  sub.eval_every = sub.total_steps  # evaluate once at the end
  sub.checkpoint_every = max(1, min(config.checkpoint_every, sub.total_steps))
  sub.label_embeddings.source = "random"
  sub.label_embeddings.ema_theta = 0.0
  return sub


def prepare(config: ml_collections.ConfigDict, workdir: str,
            domains: Sequence[Domain]) -> list[np.ndarray]:
  """[C_d * K, D] float32 label embeddings per domain, computed once and saved in the workdir."""
  k, dim = int(config.embeddings_per_class), int(config.embedding_dim)
  source = config.label_embeddings.source
  out_dir = embeddings_dir(workdir)
  result = []
  for i, domain in enumerate(domains):
    if source == "random":
      result.append(store.random_embeddings(domain.num_classes, k, dim, config.seed + i))
      continue
    if source == "file":
      paths = store.external_paths(config.label_embeddings.file, config.domain_names)
      result.append(store.load_external(paths[domain.name], domain.name, domain.num_classes,
                                        k, dim))
      continue
    path = os.path.join(out_dir, f"{domain.name}.npz")
    if os.path.exists(path):
      result.append(np.asarray(LabelEmbeddings.load(path).embeddings, np.float32))
      continue
    sub_workdir = config.label_embeddings.pretrain_checkpoint or os.path.join(
        out_dir, f"pretrain_{domain.name}")
    train.log.info("label embeddings of %s: supervised pre-training in %s", domain.name,
                   sub_workdir)
    state, _, model, _ = train.run_training(pretrain_config(config, domain.name), sub_workdir,
                                            run_eval=False, log_prefix=f"[embed {domain.name}] ")
    computed = compute_for_domain(config, model, train_step.model_variables(state), domain)
    computed.source = f"pretrain:{sub_workdir}"
    if jax.process_index() == 0:
      computed.save(path)
    result.append(np.asarray(computed.embeddings, np.float32))
  return result
