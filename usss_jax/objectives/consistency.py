"""Weak-to-strong consistency per domain (FixMatch / UniMatch).

The teacher labels the weak view of each unlabeled image (the training crop); where its
confidence reaches the threshold, the pseudo-label supervises the student on the strong view
(the same crop with photometric noise, and CutMix within the domain's batch: example i takes a
box of example i + 1, with its pseudo-labels).

Teachers (`consistency.teacher`):
  "student": the model itself in train-mode BatchNorm (no gradient through its labels);
  "ema": a mean teacher, the exponential moving average of the student's weights in eval-mode
    BatchNorm, kept in the train state as "teacher";
  "ema_train_bn": the same weights, BatchNorm on the weak batch's own statistics (a teacher
    that does not lag behind the student's fast-moving running statistics);
  "frozen": the model as training starts (e.g. a finished basic run through `init_from`),
    never updated, eval-mode BatchNorm;
  "peer": Cross Pseudo Supervision (Chen et al., CVPR 2021): a second network of its own
    initialisation, trained at the same time, kept in the train state as "peer". Each network's
    weak-view pseudo-labels (train-mode BatchNorm) train the other's strong view, and each
    minimises the method's whole objective (its own supervised term included); the train
    step runs both (`train_step`).
The EMA decay can ramp from `ema_decay_start` to `ema_decay` over `ema_decay_rampup` steps.

Thresholds (`consistency.threshold_rule`): "fixed" (`threshold` for every class) or
"freematch": the running mean confidence of the teacher, scaled per class by its running
class probabilities over their maximum, so rarely predicted classes get lower thresholds.
`distribution_alignment` multiplies the teacher's probabilities by the labeled class
frequencies over their running mean before the argmax. Diagnostics per class:
pseudo_label_share/<domain>/<class id> (share of the confident pixels) next to
labeled_share/<domain>/<class id> (share of the labeled pixels).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from usss_jax import config as config_lib
from usss_jax import losses
from usss_jax.objectives import class_statistics
from usss_jax.objectives.context import DomainContext, forward
from usss_jax.objectives.term import Term

TEACHERS = ("student", "ema", "ema_train_bn", "frozen", "peer")
THRESHOLD_RULES = ("fixed", "freematch")


@dataclasses.dataclass(frozen=True)
class ConsistencyOptions:
  threshold: float = 0.95
  threshold_rule: str = "fixed"
  distribution_alignment: bool = False
  teacher: str = "student"
  ema_decay: float = 0.99
  ema_decay_start: float = -1.0
  ema_decay_rampup: int = 0

  @property
  def keeps_teacher(self) -> bool:
    """Whether the teacher's weights are state of their own (a peer is a network of its
    own: the train step hands each network the other as its teacher)."""
    return self.teacher in ("ema", "ema_train_bn", "frozen")

  @property
  def trains_peer(self) -> bool:
    return self.teacher == "peer"

  @property
  def class_statistics(self) -> bool:
    return self.threshold_rule == "freematch" or self.distribution_alignment


def consistency_options(config: ml_collections.ConfigDict) -> ConsistencyOptions:
  c = config.consistency
  config_lib.check_choice(config, "consistency.teacher", TEACHERS)
  config_lib.check_choice(config, "consistency.threshold_rule", THRESHOLD_RULES)
  if not 0.0 <= c.threshold <= 1.0:
    raise config_lib.ConfigError(f"config.consistency.threshold={c.threshold} must be a "
                                 "confidence in [0, 1]")
  for key in ("ema_decay", "class_stats_momentum"):
    if not 0.0 <= c[key] < 1.0:
      raise config_lib.ConfigError(f"config.consistency.{key}={c[key]} must be in [0, 1)")
  if c.ema_decay_start >= 1.0:
    raise config_lib.ConfigError(f"config.consistency.ema_decay_start={c.ema_decay_start} must "
                                 "be < 1 (or < 0: no ramp)")
  return ConsistencyOptions(float(c.threshold), c.threshold_rule, bool(c.distribution_alignment),
                            c.teacher, float(c.ema_decay), float(c.ema_decay_start),
                            int(c.ema_decay_rampup))


def teacher_probabilities(params, batch_stats, weak: jax.Array, ctx: DomainContext,
                          opts: ConsistencyOptions, head: int | None = None):
  """([B, H, W, C] probabilities of head `head` (default: the domain's) on the weak view,
  without gradient; batch_stats). The teacher's forward runs once per domain and step (every
  head, when a term reads other heads: `cross_consistency`)."""
  head = ctx.index if head is None else head
  if opts.teacher == "student":
    out, batch_stats = ctx.view("weak", params, batch_stats, weak)
  else:
    if "teacher" not in ctx.memo:
      all_heads = ctx.spec.view_outputs.get("weak", {}).get("all_heads", False)
      out, _ = forward(ctx.model, ctx.state["teacher"], weak,
                       train=opts.teacher in ("ema_train_bn", "peer"),
                       head=None if all_heads else ctx.index)
      ctx.memo["teacher"] = ({"all_logits": out["logits"], "logits": out["logits"][ctx.index]}
                             if all_heads else out)
    out = ctx.memo["teacher"]
  logits = out["logits"] if head == ctx.index else out["all_logits"][head]
  return jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32)), batch_stats


def strong_view(params, batch_stats, unlabeled: dict, ctx: DomainContext):
  """(outputs of the CutMixed strong view, batch_stats, mix): `mix(x)` applies the same CutMix
  (example i takes a box of example i + 1) to weak-view pseudo-labels, confidences, masks."""
  partner = jnp.roll(jnp.arange(unlabeled["image"].shape[0]), -1)
  box = unlabeled["cutmix_mask"]
  out, batch_stats = ctx.view("strong", params, batch_stats,
                              losses.cutmix(unlabeled["strong"], box, partner))
  return out, batch_stats, lambda x: losses.cutmix(x, box, partner)


def _pseudo_labels(probs: jax.Array, ctx: DomainContext, opts: ConsistencyOptions):
  """(labels [B, H, W], confidence [B, H, W], threshold: scalar or [B, H, W])."""
  if opts.class_statistics:
    stats = ctx.state["class_stats"][ctx.index]
  if opts.distribution_alignment:
    aligned = probs * class_statistics.labeled_prior(ctx) / jnp.maximum(
        stats["teacher_probability"], 1e-6)
    probs = aligned / jnp.maximum(jnp.sum(aligned, axis=-1, keepdims=True), 1e-12)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  confidence = jnp.max(probs, axis=-1)
  threshold = opts.threshold
  if opts.threshold_rule == "freematch":
    per_class = stats["teacher_confidence"] * stats["teacher_probability"] / jnp.max(
        stats["teacher_probability"])
    threshold = per_class[labels]
  return labels, confidence, threshold


def weak_to_strong_consistency(params, batch_stats, domain_batch: dict, ctx: DomainContext):
  """FixMatch's loss on the CutMixed strong view (`losses.consistency_cross_entropy`).

  domain_batch["unlabeled"]: {"image": [B, H, W, 3] the weak view, "strong": [B, H, W, 3],
  "cutmix_mask": [B, H, W] bool (take the partner's pixel), "valid": [B, H, W] bool (not
  crop padding)}.
  """
  opts, unlabeled = ctx.options("consistency"), domain_batch["unlabeled"]
  probs, batch_stats = teacher_probabilities(params, batch_stats, unlabeled["image"], ctx, opts)
  labels, confidence, threshold = _pseudo_labels(probs, ctx, opts)
  confident = confidence >= threshold
  if opts.class_statistics:
    valid = unlabeled["valid"][..., None].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(valid), 1.0)
    ctx.aux["teacher_probability"] = jnp.sum(probs * valid, axis=(0, 1, 2)) / count
    ctx.aux["teacher_confidence"] = jnp.sum(jnp.max(probs, axis=-1) * valid[..., 0]) / count
  out, batch_stats, mix = strong_view(params, batch_stats, unlabeled, ctx)
  labels, confident, valid = (mix(x) for x in (labels, confident, unlabeled["valid"]))
  loss = losses.consistency_cross_entropy(out["logits"], labels, confident.astype(jnp.float32),
                                          threshold=0.5, valid=valid)
  return loss, batch_stats, _diagnostics(labels, confident & valid, valid, probs.shape[-1], ctx)


def _diagnostics(labels, used, valid, num_classes: int, ctx: DomainContext) -> dict:
  """Confident fraction, and per class the confident pixels' share vs the labeled share."""
  valid_f = valid.astype(jnp.float32)
  metrics = {f"confident_fraction/{ctx.name}": jnp.sum(used) / jnp.maximum(jnp.sum(valid_f), 1)}
  if ctx.options("consistency").class_statistics:
    shares = class_statistics.class_histogram(jnp.where(used, labels, -1), num_classes)
    shares = shares / jnp.maximum(jnp.sum(shares), 1.0)
    prior = class_statistics.labeled_prior(ctx)
    for c in range(num_classes):
      metrics[f"pseudo_label_share/{ctx.name}/{c}"] = shares[c]
      metrics[f"labeled_share/{ctx.name}/{c}"] = prior[c]
  return metrics


def teacher_decay(step: jax.Array, opts: ConsistencyOptions) -> jax.Array:
  """The EMA decay at `step`: ema_decay_start -> ema_decay linearly over ema_decay_rampup steps
  (else ema_decay), and at most (t+1)/(t+10) so the teacher follows the early student."""
  decay = jnp.asarray(opts.ema_decay, jnp.float32)
  if opts.ema_decay_start >= 0 and opts.ema_decay_rampup > 0:
    t = jnp.clip(step / opts.ema_decay_rampup, 0.0, 1.0)
    decay = opts.ema_decay_start + (opts.ema_decay - opts.ema_decay_start) * t
  return jnp.minimum(decay, (step + 1.0) / (step + 10.0))


def ema_teacher(teacher: dict, params, batch_stats, decay: jax.Array) -> dict:
  """Mean-teacher update: teacher <- d * teacher + (1 - d) * student.

  Integer leaves (BN's batch counter) are copied from the student.
  """
  def mix(t, s):
    if not jnp.issubdtype(s.dtype, jnp.floating):
      return s
    return (decay * t + (1.0 - decay) * s).astype(t.dtype)
  return {"params": jax.tree.map(mix, teacher["params"], params),
          "batch_stats": jax.tree.map(mix, teacher["batch_stats"], batch_stats)}


def _init_teacher(spec, params, batch_stats, num_classes) -> dict:
  del num_classes
  if not spec.options["consistency"].keeps_teacher:
    return {}
  # Copies: the step donates the state, and a buffer must not be donated twice.
  return {"teacher": jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})}


def _update_teacher(spec, state: dict, new_state: dict, aux) -> dict:
  del aux
  opts = spec.options["consistency"]
  if opts.teacher not in ("ema", "ema_train_bn"):
    return new_state
  decay = teacher_decay(state["step"], opts)
  return {**new_state, "teacher": ema_teacher(state["teacher"], new_state["params"],
                                              new_state["batch_stats"], decay)}


TERM = Term(name="consistency", loss=weak_to_strong_consistency, weight="consistency.weight",
            unlabeled=True, options=consistency_options,
            reads=lambda opts: {"weak": {"logits": True}, "strong": {"logits": True}},
            strong_views=True, class_statistics=lambda opts: opts.class_statistics,
            peer=lambda opts: opts.trains_peer,
            init_state=_init_teacher, update=_update_teacher)
