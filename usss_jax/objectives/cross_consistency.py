"""Cross-domain consistency: every other domain's head learns on this domain's unlabeled images.

The universal model has one head per domain on one encoder, so head k can label any domain's
images in k's classes. For an unlabeled batch of domain d, each head k != d labels the weak
view (the same teacher as `consistency`), and where its confidence reaches
`consistency.threshold` the pseudo-label trains head k (and the shared encoder) on the strong
view, CutMixed like consistency's. A small domain's head thus sees the other domains' unlabeled
images too (e.g. CamVid's head on 1193 IDD-Lite street scenes beside CamVid's own 82). The
loss is the mean over the other heads; pseudo-labels use the fixed threshold (the class
statistics are kept per domain for its own head).
"""

from __future__ import annotations

import jax.numpy as jnp

from usss_jax import losses
from usss_jax.objectives import consistency
from usss_jax.objectives.context import DomainContext
from usss_jax.objectives.term import Term


def cross_domain_consistency(params, batch_stats, domain_batch: dict, ctx: DomainContext):
  """Mean over heads k != d of FixMatch's loss of head k on domain d's strong view; None with
  a single domain."""
  opts, unlabeled = ctx.options("consistency"), domain_batch["unlabeled"]
  heads = [k for k in range(len(ctx.spec.trained_domains)) if k != ctx.index]
  if not heads:
    return None, batch_stats, {}
  out, batch_stats, mix = consistency.strong_view(params, batch_stats, unlabeled, ctx)
  valid = mix(unlabeled["valid"])
  terms, fractions = [], []
  for k in heads:
    probs, batch_stats = consistency.teacher_probabilities(params, batch_stats,
                                                           unlabeled["image"], ctx, opts, head=k)
    labels = mix(jnp.argmax(probs, axis=-1))
    confident = mix(jnp.max(probs, axis=-1) >= opts.threshold)
    terms.append(losses.consistency_cross_entropy(out["all_logits"][k], labels,
                                                  confident.astype(jnp.float32), threshold=0.5,
                                                  valid=valid))
    fractions.append(jnp.sum(confident & valid) / jnp.maximum(jnp.sum(valid), 1))
  return (sum(terms) / len(terms), batch_stats,
          {f"cross_confident_fraction/{ctx.name}": sum(fractions) / len(fractions)})


def _reads(opts) -> dict:
  del opts
  return {"weak": {"logits": True, "all_heads": True},
          "strong": {"logits": True, "all_heads": True}}


TERM = Term(name="cross_consistency", loss=cross_domain_consistency,
            weight="cross_consistency.weight", unlabeled=True,
            options=consistency.consistency_options, options_key="consistency", reads=_reads,
            strong_views=True)
