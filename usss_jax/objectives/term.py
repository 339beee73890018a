"""`Term`: one objective of the train step, as the METHODS table lists it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

PyTree = Any
# (params, batch_stats, domain_batch, ctx) -> (loss scalar, batch_stats, {metric: scalar})
LossFn = Callable[[PyTree, PyTree, dict, Any], tuple[Any, PyTree, dict]]


def _reads_nothing(options: Any) -> Mapping[str, Mapping[str, bool]]:
  del options
  return {}


@dataclasses.dataclass(frozen=True)
class Term:
  """One objective.

  Attributes:
    name: its name: the metric "<name>/<domain>" and the key of its options.
    loss: the pure loss of one domain's batch (see `objectives`).
    weight: dotted config key of its weight (e.g. "consistency.weight"); None = 1.
    unlabeled: reads the unlabeled images: a domain without them skips it, and with weight 0
      the term is left out (the pipeline then loads no unlabeled images for it).
    options: config -> the term's static options (checks its keys, ConfigError naming one).
    options_key: under which name the options are kept (`ctx.options(key)`); terms that share
      options (cross and within) share a key. Default: `name`.
    reads: options -> {view: {"logits" | "embedding" | "upsample_embedding": bool}}: the
      outputs it needs of each view's forward (`context.DomainContext.view`).
    label_embeddings: reads the label embeddings (the label-embedding stage runs first).
    strong_views: reads the strong views and CutMix boxes of the unlabeled images.
    class_statistics: options -> whether it reads the class statistics
      (`class_statistics.py`; the method then tracks them).
    peer: options -> whether the method trains a second network beside the model (Cross
      Pseudo Supervision): the train step then runs the method for each network, the other
      one as its "teacher" (`train_step`).
    init_state: (spec, params, batch_stats, num_classes per domain) -> train-state entries it
      adds (e.g. a teacher).
    update: (spec, state before, state after the gradient step, aux {domain: ctx.aux}) ->
      the state after its own update (EMA teacher, EMA prototypes).
  """
  name: str
  loss: LossFn
  weight: str | None = None
  unlabeled: bool = False
  options: Callable[[ml_collections.ConfigDict], Any] | None = None
  options_key: str = ""
  reads: Callable[[Any], Mapping[str, Mapping[str, bool]]] = _reads_nothing
  label_embeddings: bool = False
  strong_views: bool = False
  class_statistics: Callable[[Any], bool] = lambda options: False
  peer: Callable[[Any], bool] = lambda options: False
  init_state: Callable[..., dict] | None = None
  update: Callable[..., dict] | None = None

  def __post_init__(self):
    if not self.options_key:
      object.__setattr__(self, "options_key", self.name)
