"""The label-embedding stage (paper, supplementary B.1), per domain.

source "pretrain": train a model on the domain's labeled images alone (method
"single" on that one domain), run its encoder over those images, project the
per-pixel features with PCA to the embedding dimension and take the class
centroids (K-means for K > 1). Statistics are accumulated in streaming passes, so
memory does not grow with the number of images. Results are saved under
`<workdir>/label_embeddings/<domain>.npz` and reused on resume.

source "file": user-given vectors (e.g. word embeddings) per domain.
source "random": N(0, 1) rows, as the released reference code does.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Callable, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from usss_jax import embeddings as emb_lib
from usss_jax.data import base as data_base
from usss_jax.data import transforms


def embeddings_dir(workdir: str) -> str:
  return os.path.join(workdir, "label_embeddings")


def random_embeddings(num_classes: int, k: int, dim: int, seed: int) -> np.ndarray:
  """[C*K, D] N(0, 1) rows (the reference's default)."""
  return np.random.default_rng(seed).normal(size=(num_classes * k, dim)).astype(np.float32)


def _external_paths(spec: str, domain_names: Sequence[str]) -> dict[str, str]:
  """"name=path,name=path" or a single file holding one array per domain name."""
  if "=" in spec:
    pairs = dict(item.split("=", 1) for item in spec.split(",") if item)
    missing = [n for n in domain_names if n not in pairs]
    if missing:
      raise ValueError(f"config.label_embeddings.file={spec!r} names no file for {missing}")
    return pairs
  return {n: spec for n in domain_names}


def _load_external(path: str, name: str, num_classes: int, k: int, dim: int) -> np.ndarray:
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      if name in z.files:
        arr = np.asarray(z[name], np.float32)
        if arr.shape != (num_classes * k, dim):
          raise ValueError(f"{path}: array {name!r} has shape {arr.shape}, expected "
                           f"({num_classes * k}, {dim}) = (classes*K, embedding_dim)")
        return arr
  return np.asarray(emb_lib.LabelEmbeddings.from_external(path, num_classes, k, dim).embeddings,
                    np.float32)


@functools.lru_cache(maxsize=8)
def _features_fn(model):
  """Jitted encoder forward, one per model (so both passes of the stage share it)."""
  @jax.jit
  def features_fn(variables, image):
    return model.apply(variables, image, train=False, logits=False, features=True)["features"]
  return features_fn


def feature_label_batches(model, variables, reader: data_base.DatasetReader, examples,
                          *, domain: int, resize_hw: Sequence[int], normalization: str,
                          max_pixels_per_image: int, seed: int
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (features [N, F] float32, labels [N] int32) per labeled image.

  Features are the encoder output; labels are sampled at the centre of each
  8x8 output cell (so no feature map is ever upsampled, which keeps the pass
  cheap). At most `max_pixels_per_image` valid pixels per image, drawn with a
  seeded generator.
  """
  features_fn = _features_fn(model)
  rng = np.random.default_rng(seed)
  for ex in examples:
    item = reader.load_example(ex)
    image, label = item["image"], item["label"]
    if resize_hw:
      image, label = transforms.resize(image, label, tuple(resize_hw))
    feats = np.asarray(features_fn(variables, transforms.normalize(image, normalization)[None]))[0]
    fh, fw, f = feats.shape
    padded = np.full((fh * 8, fw * 8), data_base.IGNORE_LABEL, np.int32)
    padded[:label.shape[0], :label.shape[1]] = label
    cell_labels = padded[4::8, 4::8][:fh, :fw].reshape(-1)
    feats = feats.reshape(-1, f)
    valid = np.flatnonzero(cell_labels != data_base.IGNORE_LABEL)
    if len(valid) > max_pixels_per_image:
      valid = np.sort(rng.choice(valid, max_pixels_per_image, replace=False))
    yield feats[valid].astype(np.float32), cell_labels[valid]


def compute_from_model(model, variables, reader, examples, *, domain: int, num_classes: int,
                       k: int, dim: int, resize_hw, normalization: str,
                       max_pixels_per_image: int, seed: int) -> emb_lib.LabelEmbeddings:
  """Streaming PCA + centroids over a trained model's encoder features."""
  def batches_fn():
    return feature_label_batches(model, variables, reader, examples, domain=domain,
                                 resize_hw=resize_hw, normalization=normalization,
                                 max_pixels_per_image=max_pixels_per_image, seed=seed)
  return emb_lib.compute_label_embeddings(batches_fn, num_classes=num_classes, dim=dim, k=k,
                                          seed=seed)


def compute_for_domain(config: ml_collections.ConfigDict, model, variables,
                       domain) -> emb_lib.LabelEmbeddings:
  """A domain's label embeddings from a trained model, with the config's stage settings.

  Args:
    domain: a `train.Domain` (reader, labeled examples, its config).
  """
  return compute_from_model(
      model, variables, domain.reader, domain.labeled, domain=0,
      num_classes=domain.num_classes, k=int(config.embeddings_per_class),
      dim=int(config.embedding_dim), resize_hw=tuple(domain.config.resize),
      normalization=config.normalization,
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
