"""The label-embedding stage (paper, supplementary B.1): where each domain's prototypes come from.

source "pretrain": train a model on the domain's labeled images alone (method "single" on
that one domain, `train.run_training`), run its encoder over those images, project the
per-pixel features with PCA to the embedding dimension and take the class centroids
(K-means for K > 1), in two streaming passes whose memory does not grow with the number of
images (`label_embeddings.compute_label_embeddings`). Results are saved as
`<workdir>/label_embeddings/<domain>.npz` and reused on resume; one that does not read
(truncated, zeroed) is computed again from its pre-training run (which resumes from its
checkpoints; the result is the same) with one warning. On several processes, process 0 decides
whether to load or to compute (all of them then run the pre-training together) and writes
the file.
source "joint": the model the run starts from (`init_from`, e.g. the warm start: a basic model
trained on every domain) gives every domain's features; one PCA basis is fitted on all of them
and each domain's centroids are taken in it, so that the prototypes of all domains share their
coordinates (`label_embeddings.compute_joint_label_embeddings`). With
`label_embeddings.project_embedding` the entropy module starts as that projection, so the
prototypes classify pixels from the first step on.
source "file": user-given vectors (e.g. word embeddings) per domain.
source "random": N(0, 1) rows, as the released reference code does.

The stage calls training (for "pretrain") on the domains it is given; training never calls
the stage.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from typing import Iterator, Sequence

import jax
import ml_collections
import numpy as np

from usss_jax import config as config_lib
from usss_jax import inference, state as state_lib
from usss_jax import workdir as workdir_lib
from usss_jax.data import transforms
from usss_jax.domains import Domain
from usss_jax.label_embeddings import (SOURCES, compute_joint_label_embeddings,
                                      compute_label_embeddings, store)
from usss_jax.label_embeddings.store import LabelEmbeddings
from usss_jax.train import run_training

log = logging.getLogger("usss_jax")


def embeddings_dir(workdir: str) -> str:
  return os.path.join(workdir, "label_embeddings")


def feature_label_batches(model, variables, domain: Domain, examples=None, *,
                          resize_hw: tuple[int, int] | None, normalization: str,
                          max_pixels_per_image: int, seed: int
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (features [N, F] float32, labels [N] int32) per image of `examples`.

  Images (and labels, nearest) are resized to `resize_hw`; features are the encoder output
  and labels are sampled at the centre of each output cell (no feature map is upsampled,
  which keeps the pass cheap). At most `max_pixels_per_image` valid pixels per image, drawn
  with a seeded generator.

  Args:
    examples: which examples of `domain` (default: its labeled ones).
  """
  features_of = inference.features_fn(model)
  rng = np.random.default_rng(seed)
  for ex in domain.labeled if examples is None else examples:
    item = domain.reader.load_example(ex)
    x = transforms.eval_transform(item, resize_hw=resize_hw, normalization=normalization)
    yield inference.sampled_features(features_of, variables, x["image"], x["label"],
                                     max_pixels=max_pixels_per_image, rng=rng)


def compute_from_model(model, variables, domain: Domain, *, k: int, dim: int,
                       normalization: str, max_pixels_per_image: int,
                       seed: int) -> LabelEmbeddings:
  """Streaming PCA + centroids over a trained model's encoder features of `domain`'s
  labeled images (at its training resize)."""
  def batches_fn():
    return feature_label_batches(model, variables, domain, resize_hw=domain.resize_hw,
                                 normalization=normalization,
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


def _joint(config: ml_collections.ConfigDict, workdir: str,
           domains: Sequence[Domain]) -> list[np.ndarray]:
  """Source "joint": one basis from the model of `config.init_from` (saved per domain)."""
  paths = [os.path.join(embeddings_dir(workdir), f"{d.name}.npz") for d in domains]
  if not all(os.path.exists(p) for p in paths):
    model, state, _ = state_lib.restore(config_lib.run_config(config.init_from), config.init_from,
                                        [d.num_classes for d in domains], domains[0].crop_hw,
                                        which="latest")
    variables = state_lib.model_variables(state)
    options = dict(normalization=config.normalization,
                   max_pixels_per_image=int(config.label_embeddings.max_pixels_per_image),
                   seed=config.seed)
    fns = [functools.partial(feature_label_batches, model, variables, d, resize_hw=d.resize_hw,
                             **options) for d in domains]
    computed = compute_joint_label_embeddings(
        fns, num_classes=[d.num_classes for d in domains], dim=int(config.embedding_dim),
        k=int(config.embeddings_per_class), seed=config.seed)
    for embeddings, path in zip(computed, paths):
      embeddings.source = f"joint:{config.init_from}"
      if jax.process_index() == 0:
        embeddings.save(path)
  return [np.asarray(LabelEmbeddings.load(p).embeddings, np.float32) for p in paths]


def embedding_projection(workdir: str, domains: Sequence[Domain]) -> tuple[np.ndarray, np.ndarray]:
  """(kernel [1, 1, F, D], bias [D]) of the entropy module that computes the joint PCA
  projection (x - mean) @ components.T of the encoder features."""
  saved = LabelEmbeddings.load(os.path.join(embeddings_dir(workdir), f"{domains[0].name}.npz"))
  components = np.asarray(saved.pca_components, np.float32)  # [D, F]
  return components.T[None, None], -np.asarray(saved.pca_mean, np.float32) @ components.T


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the key for label_embeddings.* values that cannot work."""
  config_lib.check_choice(config, "label_embeddings.source", SOURCES)
  le = config.label_embeddings
  if le.project_embedding and le.source != "joint":
    raise config_lib.ConfigError("config.label_embeddings.project_embedding needs "
                                 "config.label_embeddings.source='joint' (one PCA basis)")
  if le.source == "joint" and not (config.init_from or config.warm_start.steps > 0):
    raise config_lib.ConfigError(
        "config.label_embeddings.source='joint' takes the model the run starts from: set "
        "config.init_from or config.warm_start.steps")


def _saved_or_not(path: str, expected: tuple[int, int]) -> str:
  """"load" when `path` holds label embeddings of shape `expected`, else "compute"."""
  if not os.path.exists(path):
    return "compute"
  try:
    shape = LabelEmbeddings.load(path).embeddings.shape
  except ValueError as e:
    log.warning("%s does not read (%s); computing it again from its pre-training run", path,
                str(e).partition(" (")[2].rstrip(")")[:160] or "damaged")
    return "compute"
  if shape != expected:
    raise config_lib.ConfigError(
        f"{path}: label embeddings of shape {shape}, but this config asks for {expected} "
        "(classes x embeddings_per_class, embedding_dim)\nhint: delete the file to compute "
        "them again for this config, or train in a new --workdir")
  return "load"


def prepare(config: ml_collections.ConfigDict, workdir: str,
            domains: Sequence[Domain]) -> list[np.ndarray]:
  """[C_d * K, D] float32 label embeddings per domain, computed once and saved in the workdir."""
  k, dim = int(config.embeddings_per_class), int(config.embedding_dim)
  source = config.label_embeddings.source
  if source == "joint":
    return _joint(config, workdir, domains)
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
    expected = (domain.num_classes * k, dim)
    if workdir_lib.broadcast_decision(f"embeddings/{domain.name}",
                                      lambda: _saved_or_not(path, expected)) == "load":
      result.append(np.asarray(LabelEmbeddings.load(path).embeddings, np.float32))
      continue
    sub_workdir = config.label_embeddings.pretrain_checkpoint or os.path.join(
        out_dir, f"pretrain_{domain.name}")
    log.info("label embeddings of %s: supervised pre-training in %s", domain.name, sub_workdir)
    sub_config = pretrain_config(config, domain.name)
    alone = dataclasses.replace(domain, index=0)  # the only head of its pre-training run
    state, _ = run_training(sub_config, sub_workdir, [alone],
                            log_prefix=f"[embed {domain.name}] ")
    model = state_lib.make_model(sub_config, [domain.num_classes])
    computed = compute_for_domain(config, model, state_lib.model_variables(state), alone)
    computed.source = f"pretrain:{sub_workdir}"
    if jax.process_index() == 0:
      computed.save(path)
    result.append(np.asarray(computed.embeddings, np.float32))
  return result
