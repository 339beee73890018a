"""The SER baseline: the softmax entropy of the domain's head on its unlabeled images."""

from __future__ import annotations

from usss_jax import losses
from usss_jax.objectives.context import DomainContext
from usss_jax.objectives.term import Term


def head_softmax_entropy(params, batch_stats, domain_batch: dict, ctx: DomainContext):
  """Mean per-pixel entropy of softmax(head logits) on domain_batch["unlabeled"]["image"]."""
  out, batch_stats = ctx.view("unlabeled", params, batch_stats,
                              domain_batch["unlabeled"]["image"])
  return losses.decoder_softmax_entropy(out["logits"]), batch_stats, {}


TERM = Term(name="ser", loss=head_softmax_entropy, weight="ser_weight", unlabeled=True,
            reads=lambda options: {"unlabeled": {"logits": True}})
