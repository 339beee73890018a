"""What the terms of one domain's batch share within a train step: the forwards and their outputs.

Every term of a domain runs inside the step's loss function with a `DomainContext`. A forward
of the model on one *view* of the domain's batch ("labeled", "unlabeled", "weak", "strong") is
run once, by the first term that needs it, and its outputs are kept for the later terms: the
prototype term reads the labeled forward's embedding, the alignment terms read the strong
forward of consistency. Which outputs each view's forward computes is the union of what the
method's terms read (`MethodSpec.view_outputs`), so the first forward already has them.

Batch-norm statistics: a train-mode forward normalises with its own batch and updates the
running statistics; the terms thread `batch_stats` through in the order they run, so the
running averages see every forward in a fixed order (domains in head order, then the terms).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

PyTree = Any
VIEWS = ("labeled", "unlabeled", "weak", "strong")


def forward(model, variables: dict, images: jax.Array, *, train: bool,
            **flags) -> tuple[dict, PyTree]:
  """(model outputs, batch_stats): train-mode forwards return the updated running statistics.

  Args:
    model: the UniversalSegmenter.
    variables: {"params", "batch_stats"}.
    images: [B, H, W, 3].
    train: batch statistics (and their running averages updated) or the running statistics.
    **flags: what to compute (`head`, `logits`, `embedding`, `upsample_embedding`).
  """
  if not train:
    return model.apply(variables, images, train=False, **flags), variables["batch_stats"]
  out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], **flags)
  # Running statistics are data, not a path for gradients (a later eval-mode forward would
  # otherwise backpropagate into the encoder through them).
  return out, jax.lax.stop_gradient(updates["batch_stats"])


def freeze_encoder(params: dict) -> dict:
  """`params` with no gradient into the encoder (the heads of method "single"'s other domains)."""
  return {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}


@dataclasses.dataclass
class DomainContext:
  """One domain's share of a train step.

  Attributes:
    model: the UniversalSegmenter.
    spec: the method (`objectives.MethodSpec`): terms, weights, options, view outputs.
    index: the domain's head index; name: its name (metric keys).
    trained: False when method "single" freezes the encoder for this domain.
    state: the train state before the step (label embeddings, teacher, class statistics);
      read only: terms change it through `aux` and the terms' `update`.
    outputs: view -> outputs of this step's forward of that view (filled as terms run).
    aux: values the terms pass to the state updates after the gradient step (no gradient).
    memo: values one term computes for another of the same domain (e.g. alignment scores).
  """
  model: Any
  spec: Any
  index: int
  name: str
  trained: bool
  state: dict
  outputs: dict = dataclasses.field(default_factory=dict)
  aux: dict = dataclasses.field(default_factory=dict)
  memo: dict = dataclasses.field(default_factory=dict)

  def fork(self) -> DomainContext:
    """A copy whose forwards, aux and memo start as this one's and do not flow back (a
    branch traced on its own, e.g. the unlabeled terms under the warm-up's lax.cond)."""
    return dataclasses.replace(self, outputs=dict(self.outputs), aux=dict(self.aux),
                               memo=dict(self.memo))

  def options(self, term: str) -> Any:
    """The resolved options of `term` (its `Term.options(config)`)."""
    return self.spec.options[term]

  def view(self, view: str, params: PyTree, batch_stats: PyTree, images: jax.Array, *,
           train: bool = True) -> tuple[dict, PyTree]:
    """This step's outputs of the model on `view` (run on first use, then shared).

    Args:
      view: one of VIEWS.
      params: the parameters to run with (the same for every term reading the view).
      batch_stats: the running statistics so far; returned updated by a train-mode forward.
      images: [B, H, W, 3] the view's images.
      train: batch statistics (True) or the running statistics.
    Returns:
      (outputs: "logits" [B, H, W, C] and what `spec.view_outputs[view]` asks for (with
       "all_heads": "all_logits", every head's logits), batch_stats).
    """
    if view in self.outputs:
      return self.outputs[view], batch_stats
    flags = dict(self.spec.view_outputs.get(view, {}))
    all_heads = flags.pop("all_heads", False)
    out, batch_stats = forward(self.model, {"params": params, "batch_stats": batch_stats}, images,
                               train=train, head=None if all_heads else self.index, **flags)
    if all_heads:
      out = {**out, "all_logits": out["logits"], "logits": out["logits"][self.index]}
    self.outputs[view] = out
    return out, batch_stats
