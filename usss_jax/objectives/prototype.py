"""The prototype term: the labeled pixels scored against their own domain's prototypes.

It ties the entropy module's space to the classes: a cross entropy of the labeled pixels'
prototype scores (weight `prototype_loss_weight`, off by default), and the diagnostics
prototype_accuracy (prototype argmax = label) and prototype_head_agreement (= the head's
argmax) that every label-embedding method logs. With `label_embeddings.ema_theta` > 0 the
prototypes follow the model: after each step every class's row moves towards the mean
embedding of the batch's labeled pixels of that class (`label_embeddings.ema`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from usss_jax import losses
from usss_jax.data.base import IGNORE_LABEL
from usss_jax.label_embeddings import ema, stats
from usss_jax.objectives import alignment
from usss_jax.objectives.context import DomainContext, freeze_encoder
from usss_jax.objectives.term import Term


@dataclasses.dataclass(frozen=True)
class PrototypeOptions:
  scoring: alignment.AlignmentOptions
  ema_theta: float = 0.0  # config.label_embeddings.ema_theta


def prototype_options(config: ml_collections.ConfigDict) -> PrototypeOptions:
  return PrototypeOptions(alignment.alignment_options(config),
                          float(config.label_embeddings.ema_theta))


def labeled_prototype_cross_entropy(params, batch_stats, domain_batch: dict,
                                    ctx: DomainContext):
  """Cross entropy of the labeled pixels' (upsampled) prototype scores, and the diagnostics."""
  labeled = domain_batch["labeled"]
  out, batch_stats = ctx.view("labeled", params if ctx.trained else freeze_encoder(params),
                              batch_stats, labeled["image"], train=ctx.trained)
  opts, labels = ctx.options("prototype"), labeled["label"]
  scores = alignment.prototype_scores(out["embedding"], ctx.state["label_embeddings"][ctx.index],
                                      opts.scoring)
  scores = ctx.model.upsample_scores(scores, labels.shape[1:3])
  valid = labels != IGNORE_LABEL
  proto_pred = jnp.argmax(scores, axis=-1)
  head_pred = jnp.argmax(out["logits"], axis=-1)
  count = jnp.maximum(jnp.sum(valid), 1)
  metrics = {
      f"prototype_accuracy/{ctx.name}": jnp.sum((proto_pred == labels) & valid) / count,
      f"prototype_head_agreement/{ctx.name}": jnp.sum((proto_pred == head_pred) & valid) / count,
  }
  if opts.ema_theta > 0:
    embedding = out["embedding"]
    ctx.aux["prototype_pixels"] = (embedding,
                                   stats.cell_centre_labels(labels, embedding.shape[1:3]))
  return losses.pixel_cross_entropy(scores, labels), batch_stats, metrics


def update_prototypes(spec, state: dict, new_state: dict, aux: tuple[dict, ...]) -> dict:
  """EMA prototypes: each domain's rows move towards its labeled pixels' class means."""
  opts = spec.options["prototype"]
  if opts.ema_theta <= 0:
    return new_state
  k = opts.scoring.embeddings_per_class
  updated = []
  for prototypes, domain_aux in zip(state["label_embeddings"], aux):
    pixels, labels = domain_aux["prototype_pixels"]
    updated.append(ema.ema_update_centroids(prototypes, pixels,
                                            jnp.where(labels == IGNORE_LABEL, 0, labels),
                                            labels != IGNORE_LABEL, opts.ema_theta, k))
  return {**new_state, "label_embeddings": tuple(updated)}


def _reads(opts: PrototypeOptions):
  del opts
  # The diagnostics compare with the head, so the labeled forward also gives the logits.
  return {"labeled": {"logits": True, "embedding": True, "upsample_embedding": False}}


TERM = Term(name="prototype", loss=labeled_prototype_cross_entropy,
            weight="prototype_loss_weight", options=prototype_options, reads=_reads,
            label_embeddings=True, update=update_prototypes)
