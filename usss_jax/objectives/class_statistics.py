"""Class statistics of each domain, tracked in the train state for class-aware objectives.

state["class_stats"][d] = {
  "labeled_pixels":      [C] labeled pixels of each class seen in training so far (the
                         labeled class frequencies: the prior of distribution alignment and of
                         the infomax_prior alignment),
  "teacher_probability": [C] running mean of the teacher's class probabilities on unlabeled
                         pixels (FreeMatch's class-wise thresholds, distribution alignment),
  "teacher_confidence":  [] running mean of the teacher's confidence (FreeMatch's threshold),
}
The term itself has no loss: it counts the labeled batch's classes; the terms that need the
statistics ask for it (`Term.class_statistics`) and `objectives.method_spec` puts it first.
Checkpointed with the state, so a resumed run continues the same running means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from usss_jax.data.base import IGNORE_LABEL
from usss_jax.objectives.context import DomainContext
from usss_jax.objectives.term import Term


def class_histogram(labels: jax.Array, num_classes: int) -> jax.Array:
  """[...] class ids (IGNORE_LABEL and ids >= C skipped) -> [C] float32 counts."""
  labels = labels.reshape(-1).astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.bincount(jnp.where(valid, labels, num_classes), length=num_classes + 1
                      )[:num_classes].astype(jnp.float32)


def labeled_prior(ctx: DomainContext, index: int | None = None) -> jax.Array:
  """[C] labeled class frequencies of domain `index` (default: ctx's), this batch included;
  uniform before any labeled pixel was seen."""
  index = ctx.index if index is None else index
  counts = ctx.state["class_stats"][index]["labeled_pixels"]
  if index == ctx.index:
    counts = counts + ctx.memo["labeled_histogram"]
  total = jnp.sum(counts)
  return jnp.where(total > 0, counts / jnp.maximum(total, 1.0), 1.0 / counts.shape[0])


def count_labeled_classes(params, batch_stats, domain_batch: dict, ctx: DomainContext):
  """No loss: the labeled batch's class histogram, for the prior and the state update."""
  del params
  num_classes = ctx.state["class_stats"][ctx.index]["labeled_pixels"].shape[0]
  labels = domain_batch["labeled"]["label"]
  ctx.memo["labeled_histogram"] = class_histogram(
      jnp.where(labels == IGNORE_LABEL, -1, labels), num_classes)
  ctx.aux["labeled_histogram"] = ctx.memo["labeled_histogram"]
  return None, batch_stats, {}


def init_class_stats(num_classes) -> dict:
  """The statistics before training, per domain (uniform teacher, no labeled pixel)."""
  return {"class_stats": tuple(
      {"labeled_pixels": jnp.zeros((c,), jnp.float32),
       "teacher_probability": jnp.full((c,), 1.0 / c, jnp.float32),
       "teacher_confidence": jnp.full((), 1.0 / c, jnp.float32)} for c in num_classes)}


def update_class_stats(spec, state: dict, new_state: dict, aux: tuple[dict, ...]) -> dict:
  """Adds the labeled histograms; moves the teacher's running means where it labeled images."""
  momentum = spec.options["class_statistics"]
  updated = []
  for stats, domain_aux in zip(state["class_stats"], aux):
    stats = dict(stats, labeled_pixels=stats["labeled_pixels"] + domain_aux["labeled_histogram"])
    if "teacher_probability" in domain_aux:
      ran = domain_aux["unlabeled_ran"]
      for key in ("teacher_probability", "teacher_confidence"):
        moved = momentum * stats[key] + (1.0 - momentum) * domain_aux[key]
        stats[key] = jnp.where(ran, moved, stats[key])
    updated.append(stats)
  return {**new_state, "class_stats": tuple(updated)}


TERM = Term(name="class_statistics", loss=count_labeled_classes,
            options=lambda config: float(config.consistency.class_stats_momentum),
            init_state=lambda spec, params, batch_stats, num_classes: init_class_stats(
                num_classes),
            update=update_class_stats)
