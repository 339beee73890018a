"""The training objectives: one file per term, and one table from a method to its terms.

A term is a pure function of one domain's batch,

    loss(params, batch_stats, domain_batch, ctx) -> (loss, batch_stats, metrics),

where `domain_batch` is {"labeled": {"image", "label"}, "unlabeled": {...}} and `ctx` the
domain's `context.DomainContext` (its head, the state before the step, the forwards other
terms already ran). The train step runs, for every domain in head order, the method's terms in
table order and minimises sum over terms of weight x (sum over domains of the term's loss).

supervised (supervised.py, weight 1): cross entropy of the labeled pixels (ignore 255).
prototype (prototype.py, prototype_loss_weight): cross entropy of the labeled pixels' prototype
  scores; the prototype diagnostics; EMA prototypes (label_embeddings.ema_theta).
cross, within (alignment.py, alpha, beta): the unlabeled pixels' scores against the other
  domains' / the domain's own prototypes (entropy, or information maximisation).
ser (ser.py, ser_weight): softmax entropy of the head on unlabeled images.
consistency (consistency.py, consistency.weight): pseudo-labels of the weak view train the
  strong view.
cross_consistency (cross_consistency.py, cross_consistency.weight): the same for every other
  domain's head on the domain's images.
class_statistics (class_statistics.py, no loss): class frequencies for class-aware terms.

Adding an objective: write `objectives/<name>.py` ending in `TERM = Term(...)`, import it here
and add it to the rows of METHODS that use it; its config keys go into `config.base_config()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from usss_jax import config as config_lib
from usss_jax.objectives import (alignment, class_statistics, consistency, cross_consistency,
                                 prototype, ser, supervised)
from usss_jax.objectives.context import DomainContext, VIEWS
from usss_jax.objectives.term import Term

# The train-state key of the second network of Cross Pseudo Supervision (`MethodSpec.trains_peer`).
PEER = "peer"

# What each method minimises, in the order the terms run for every domain (the terms of the
# labeled images first: the unlabeled ones run together, skipped during a warm-up).
METHODS: dict[str, tuple[Term, ...]] = {
    # One domain's labels train the encoder; the other heads learn on it frozen.
    "single": (supervised.TERM,),
    # Joint supervised training (univ-basic).
    "basic": (supervised.TERM,),
    # univ-cross / univ-full: the label-embedding terms on the unlabeled images.
    "cross": (supervised.TERM, prototype.TERM, alignment.CROSS),
    "full": (supervised.TERM, prototype.TERM, alignment.CROSS, alignment.WITHIN),
    # The direct softmax-entropy baseline (SER).
    "ser": (supervised.TERM, ser.TERM),
    # Weak-to-strong consistency per domain (FixMatch / UniMatch).
    # With cross_consistency.weight > 0 every other domain's head learns on the domain's
    # unlabeled images too.
    "consistency": (supervised.TERM, consistency.TERM, cross_consistency.TERM),
    # Consistency plus the terms of full, aligned on the strong view.
    "universal": (supervised.TERM, prototype.TERM, consistency.TERM, cross_consistency.TERM,
                  alignment.CROSS_ON_STRONG, alignment.WITHIN_ON_STRONG),
}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A method resolved from a config: what the step computes (static under jit).

  Attributes:
    method: its name (a key of METHODS).
    terms: the terms that run, in order (unlabeled terms of weight 0 are left out).
    weights: the weight of each term.
    trained_domains: per domain, False where method "single" freezes the encoder.
    options: term name -> its resolved options.
    view_outputs: view -> the model flags its forward runs with (what the terms read).
    warmup_steps: the unlabeled terms start after these supervised-only steps ...
    rampup_steps: ... and their weights ramp up over these steps (config.unlabeled).
  """
  method: str
  terms: tuple[Term, ...]
  weights: tuple[float, ...]
  trained_domains: tuple[bool, ...]
  options: Mapping[str, Any]
  view_outputs: Mapping[str, Mapping[str, bool]]
  warmup_steps: int = 0
  rampup_steps: int = 0

  @property
  def schedules_unlabeled(self) -> bool:
    """Whether a warm-up or ramp-up scales the unlabeled terms."""
    return self.uses_unlabeled and (self.warmup_steps > 0 or self.rampup_steps > 0)

  def unlabeled_scale(self, step: jax.Array) -> jax.Array:
    """The factor of the unlabeled terms' weights at `step` (0-based, before the update):
    0 during the warm-up, then exp(-5 (1 - t)^2), t = (step - warmup) / rampup in [0, 1]."""
    after = jnp.asarray(step, jnp.float32) - self.warmup_steps
    if self.rampup_steps <= 0:
      return (after >= 0).astype(jnp.float32)
    t = jnp.clip(after / self.rampup_steps, 0.0, 1.0)
    return jnp.where(after >= 0, jnp.exp(-5.0 * jnp.square(1.0 - t)), 0.0)

  @property
  def uses_unlabeled(self) -> bool:
    """Whether any term reads the unlabeled images (the pipeline loads them)."""
    return any(t.unlabeled for t in self.terms)

  @property
  def uses_label_embeddings(self) -> bool:
    """Whether any term reads the label embeddings (the stage computes them first)."""
    return any(t.label_embeddings for t in self.terms)

  @property
  def uses_strong_views(self) -> bool:
    """Whether the unlabeled batches carry strong views and CutMix boxes."""
    return any(t.strong_views for t in self.terms)

  @property
  def trains_peer(self) -> bool:
    """Whether a second network trains beside the model (state["peer"]; `Term.peer`)."""
    return any(t.peer(self.options.get(t.options_key)) for t in self.terms)

  def has(self, name: str) -> bool:
    return any(t.name == name for t in self.terms)

  def init_state(self, params, batch_stats) -> dict:
    """The extra train-state entries of the method's terms (e.g. the EMA teacher)."""
    num_classes = [params[f"head_{d}"]["kernel"].shape[-1]
                   for d in range(len(self.trained_domains))]
    extra: dict = {}
    for term in self.terms:
      if term.init_state is not None:
        extra.update(term.init_state(self, params, batch_stats, num_classes))
    return extra


for _method, _terms in METHODS.items():
  assert [t.unlabeled for t in _terms] == sorted(t.unlabeled for t in _terms), _method


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def _merge_views(reads: list[Mapping[str, Mapping[str, bool]]]) -> dict[str, dict[str, bool]]:
  """The flags of each view's forward: every output some term reads (logits off unless read)."""
  merged: dict[str, dict[str, bool]] = {}
  for read in reads:
    for view, flags in read.items():
      if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
      out = merged.setdefault(view, {"logits": False, "embedding": False,
                                     "upsample_embedding": True})
      out["logits"] |= flags.get("logits", False)
      out["embedding"] |= flags.get("embedding", False)
      if flags.get("all_heads"):
        out["all_heads"] = True
      if "upsample_embedding" in flags:
        out["upsample_embedding"] = flags["upsample_embedding"]
  return merged


def method_spec(config: ml_collections.ConfigDict) -> MethodSpec:
  """Resolves `config.method` and the keys its terms read; ConfigError naming a bad key."""
  config_lib.check_choice(config, "method", METHODS)
  names = tuple(config.domain_names)
  terms, weights = [], []
  for term in METHODS[config.method]:
    weight = 1.0 if term.weight is None else float(_value(config, term.weight))
    if weight == 0 and term.unlabeled:
      continue  # no gradient, and the unlabeled images need not be loaded
    terms.append(term)
    weights.append(weight)
  options = {t.options_key: t.options(config) for t in terms if t.options is not None}
  if any(t.class_statistics(options.get(t.options_key)) for t in terms):
    terms.insert(0, class_statistics.TERM)
    weights.insert(0, 1.0)
    options["class_statistics"] = class_statistics.TERM.options(config)
  trained = tuple(True for _ in names)
  if config.method == "single":
    source = config.single_domain or names[0]
    trained = tuple(n == source for n in names)
  reads = [t.reads(options.get(t.options_key)) for t in terms]
  schedule = config.unlabeled
  if schedule.warmup_steps < 0 or schedule.rampup_steps < 0:
    raise config_lib.ConfigError(f"config.unlabeled={schedule.to_dict()}: the warm-up and ramp-up "
                                 "lengths must be >= 0")
  return MethodSpec(method=config.method, terms=tuple(terms), weights=tuple(weights),
                    trained_domains=trained, options=options, view_outputs=_merge_views(reads),
                    warmup_steps=int(schedule.warmup_steps),
                    rampup_steps=int(schedule.rampup_steps))


__all__ = ["METHODS", "PEER", "MethodSpec", "Term", "DomainContext", "method_spec"]
