"""The supervised term: cross entropy of a domain's labeled pixels (label 255 ignored).

Method "single" trains the encoder with one domain's labels only: the other domains' heads
learn on the frozen encoder in eval mode (`DomainContext.trained` is False for them).
"""

from __future__ import annotations

from usss_jax import losses
from usss_jax.objectives.context import DomainContext, freeze_encoder
from usss_jax.objectives.term import Term


def supervised_cross_entropy(params, batch_stats, domain_batch: dict, ctx: DomainContext):
  """Mean cross entropy over the labeled batch's non-ignored pixels.

  domain_batch["labeled"]: {"image": [B, H, W, 3], "label": [B, H, W] int (255 = ignore)}.
  """
  labeled = domain_batch["labeled"]
  out, batch_stats = ctx.view("labeled", params if ctx.trained else freeze_encoder(params),
                              batch_stats, labeled["image"], train=ctx.trained)
  return losses.pixel_cross_entropy(out["logits"], labeled["label"]), batch_stats, {}


TERM = Term(name="supervised", loss=supervised_cross_entropy,
            reads=lambda options: {"labeled": {"logits": True}})
