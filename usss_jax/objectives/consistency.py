"""Weak-to-strong consistency per domain (FixMatch / UniMatch).

The teacher labels the weak view of each unlabeled image (the training crop); where its
confidence reaches `consistency.threshold`, the pseudo-label supervises the student on the
strong view (the same crop with photometric noise, and CutMix within the domain's batch:
example i takes a box of example i + 1, with its pseudo-labels). Teachers
(`consistency.teacher`):
  "student": the model itself in train-mode BatchNorm (no gradient through the teacher);
  "ema": a mean teacher, the exponential moving average of the student's weights
    (`consistency.ema_decay`) in eval-mode BatchNorm, kept in the train state as "teacher".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from usss_jax import config as config_lib
from usss_jax import losses
from usss_jax.objectives.context import DomainContext, forward
from usss_jax.objectives.term import Term

TEACHERS = ("student", "ema")


@dataclasses.dataclass(frozen=True)
class ConsistencyOptions:
  threshold: float = 0.95
  teacher: str = "student"
  ema_decay: float = 0.99


def consistency_options(config: ml_collections.ConfigDict) -> ConsistencyOptions:
  c = config.consistency
  config_lib.check_choice(config, "consistency.teacher", TEACHERS)
  if not 0.0 <= c.threshold <= 1.0:
    raise config_lib.ConfigError(f"config.consistency.threshold={c.threshold} must be a "
                                 "confidence in [0, 1]")
  if not 0.0 <= c.ema_decay < 1.0:
    raise config_lib.ConfigError(f"config.consistency.ema_decay={c.ema_decay} must be in [0, 1)")
  return ConsistencyOptions(float(c.threshold), c.teacher, float(c.ema_decay))


def weak_to_strong_consistency(params, batch_stats, domain_batch: dict, ctx: DomainContext):
  """FixMatch's loss on the CutMixed strong view (`losses.consistency_cross_entropy`).

  domain_batch["unlabeled"]: {"image": [B, H, W, 3] the weak view, "strong": [B, H, W, 3],
  "cutmix_mask": [B, H, W] bool (take the partner's pixel), "valid": [B, H, W] bool (not
  crop padding)}.
  """
  opts, unlabeled = ctx.options("consistency"), domain_batch["unlabeled"]
  weak = unlabeled["image"]
  if opts.teacher == "ema":
    teacher, _ = forward(ctx.model, ctx.state["teacher"], weak, train=False, head=ctx.index)
  else:
    teacher, batch_stats = ctx.view("weak", jax.lax.stop_gradient(params), batch_stats, weak)
  labels, confidence = losses.pseudo_labels(teacher["logits"])
  partner = jnp.roll(jnp.arange(weak.shape[0]), -1)
  box = unlabeled["cutmix_mask"]
  strong = losses.cutmix(unlabeled["strong"], box, partner)
  labels, confidence, valid = (losses.cutmix(x, box, partner)
                               for x in (labels, confidence, unlabeled["valid"]))
  out, batch_stats = ctx.view("strong", params, batch_stats, strong)
  loss = losses.consistency_cross_entropy(out["logits"], labels, confidence,
                                          threshold=opts.threshold, valid=valid)
  valid_f = valid.astype(jnp.float32)
  confident = jnp.sum((confidence >= opts.threshold) * valid_f) / jnp.maximum(jnp.sum(valid_f), 1)
  return loss, batch_stats, {f"confident_fraction/{ctx.name}": confident}


def ema_teacher(teacher: dict, params, batch_stats, step: jax.Array, decay: float) -> dict:
  """Mean-teacher update: teacher <- d * teacher + (1 - d) * student, d = min(decay, (t+1)/(t+10)).

  The ramp lets the teacher follow the quickly changing early student. Integer leaves (BN's
  batch counter) are copied from the student.
  """
  d = jnp.minimum(decay, (step + 1.0) / (step + 10.0))

  def mix(t, s):
    if not jnp.issubdtype(s.dtype, jnp.floating):
      return s
    return (d * t + (1.0 - d) * s).astype(t.dtype)
  return {"params": jax.tree.map(mix, teacher["params"], params),
          "batch_stats": jax.tree.map(mix, teacher["batch_stats"], batch_stats)}


def _init_teacher(spec, params, batch_stats) -> dict:
  if spec.options["consistency"].teacher != "ema":
    return {}
  # Copies: the step donates the state, and a buffer must not be donated twice.
  return {"teacher": jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})}


def _update_teacher(spec, state: dict, new_state: dict, aux) -> dict:
  del aux
  opts = spec.options["consistency"]
  if opts.teacher != "ema":
    return new_state
  return {**new_state, "teacher": ema_teacher(state["teacher"], new_state["params"],
                                              new_state["batch_stats"], state["step"],
                                              opts.ema_decay)}


TERM = Term(name="consistency", loss=weak_to_strong_consistency, weight="consistency.weight",
            unlabeled=True, options=consistency_options,
            reads=lambda opts: {"weak": {"logits": True}, "strong": {"logits": True}},
            strong_views=True, init_state=_init_teacher, update=_update_teacher)
