"""The train step: the pure `(state, batch) -> (state, metrics)` that composes a method's terms.

For every domain in head order the step runs the method's terms (`objectives.METHODS`) on that
domain's batch, minimises sum over terms of weight x (sum over domains of the term's loss) with
one gradient and one optimiser update, then lets the terms update their own state (EMA teacher,
EMA prototypes). It is jitted with the state replicated (and donated) and the batch sharded over
the mesh's "data" axis (`jit_train_step`); the loop (`usss_jax.train`) owns every side effect.

Batch-norm statistics: every train-mode forward normalises with its own batch (global over
the devices under jit: synchronised BN) and updates the running averages in a fixed order:
domains in head order, within a domain the order of the terms' forwards.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from usss_jax import sharding
from usss_jax import state as state_lib
from usss_jax.objectives import PEER, DomainContext, MethodSpec


def make_train_step(model, tx: optax.GradientTransformation, spec: MethodSpec,
                    domain_names: Sequence[str]):
  """Returns the pure step `(state, batch) -> (state, metrics)`.

  Args:
    model: a UniversalSegmenter.
    tx: the optax transformation.
    spec: the method (`objectives.method_spec`).
    domain_names: head order; the batch's keys.
  The batch is {name: {"labeled": {"image": [B, h, w, 3], "label": [B, h, w]},
  "unlabeled": {"image": [B_u, h, w, 3] (the weak view), and with strong views "strong"
  [B_u, h, w, 3], "cutmix_mask" [B_u, h, w] bool, "valid" [B_u, h, w] bool}}}.
  Metrics: "loss", "grad_norm", "<term>/<domain>" of every term with a non-zero weight, and
  the terms' diagnostics; with a peer (Cross Pseudo Supervision) the same again for the peer,
  prefixed "peer/".
  """
  domain_names = tuple(domain_names)

  def loss_fn(params, state, batch):
    batch_stats, metrics, aux = state["batch_stats"], {}, []
    per_term = [[] for _ in spec.terms]
    unlabeled_scale = spec.unlabeled_scale(state["step"])
    if spec.schedules_unlabeled:
      metrics["unlabeled_weight"] = unlabeled_scale
    for d, name in enumerate(domain_names):
      ctx = DomainContext(model, spec, d, name, spec.trained_domains[d], state)
      losses, batch_stats, domain_metrics = _domain_terms(spec, params, batch_stats, batch[name],
                                                          ctx)
      metrics.update(domain_metrics)
      for i, loss in losses.items():
        if loss is not None and spec.weights[i] != 0:
          per_term[i].append(loss)
          metrics[f"{spec.terms[i].name}/{name}"] = loss
      aux.append(ctx.aux)
    zero, total = jnp.zeros((), jnp.float32), None
    for term, weight, losses in zip(spec.terms, spec.weights, per_term):
      if losses:
        weighted = weight * sum(losses, zero)
        if term.unlabeled and spec.schedules_unlabeled:
          weighted = unlabeled_scale * weighted
        total = weighted if total is None else total + weighted
    metrics["loss"] = zero if total is None else total
    return metrics["loss"], (batch_stats, metrics, tuple(aux))

  def network_step(state, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (batch_stats, metrics, aux)), grads = grad_fn(state["params"], state, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    metrics["grad_norm"] = optax.global_norm(grads)
    new_state = {**state, "params": optax.apply_updates(state["params"], updates),
                 "batch_stats": batch_stats, "opt_state": opt_state, "step": state["step"] + 1}
    for term in spec.terms:
      if term.update is not None:
        new_state = term.update(spec, state, new_state, aux)
    return new_state, metrics

  def train_step(state, batch):
    if not spec.trains_peer:
      return network_step(state, batch)
    # Cross Pseudo Supervision: each network takes the other's weights before the step as its
    # teacher, so the two updates are symmetric and independent of their order.
    model_state, peer_state = split_peer(state)
    new_model, metrics = network_step(model_state, batch)
    new_peer, peer_metrics = network_step(peer_state, batch)
    metrics.update({f"{PEER}/{k}": v for k, v in peer_metrics.items()})
    return join_peer(new_model, new_peer), metrics

  return train_step


def split_peer(state: dict) -> tuple[dict, dict]:
  """(the model's, the peer's) states of a state with a peer, each with the other network's
  {"params", "batch_stats"} as "teacher"; the step counter is shared."""
  peer = state[PEER]
  model_state = {k: v for k, v in state.items() if k != PEER}
  return ({**model_state, "teacher": state_lib.model_variables(peer)},
          {**peer, "step": state["step"], "teacher": state_lib.model_variables(state)})


def join_peer(model_state: dict, peer_state: dict) -> dict:
  """The inverse of `split_peer` after each network's step."""
  drop = ("teacher", "step")
  return {**{k: v for k, v in model_state.items() if k != "teacher"},
          PEER: {k: v for k, v in peer_state.items() if k not in drop}}


def _domain_terms(spec: MethodSpec, params, batch_stats, domain_batch: dict,
                  ctx: DomainContext):
  """({term index: its loss or None}, batch_stats, metrics) of one domain's batch: the terms of
  the labeled images, then those of the unlabeled images if the domain has any."""
  labeled = [i for i, t in enumerate(spec.terms) if not t.unlabeled]
  losses, batch_stats, metrics = _run_terms([spec.terms[i] for i in labeled], params,
                                            batch_stats, domain_batch, ctx)
  out = dict(zip(labeled, losses))
  unlabeled = [i for i, t in enumerate(spec.terms) if t.unlabeled]
  if unlabeled and "unlabeled" in domain_batch:
    losses, batch_stats, more = _unlabeled_terms(spec, [spec.terms[i] for i in unlabeled],
                                                 params, batch_stats, domain_batch, ctx)
    out.update(zip(unlabeled, losses))
    metrics.update(more)
  return out, batch_stats, metrics


def _run_terms(terms, params, batch_stats, domain_batch: dict, ctx: DomainContext):
  """(each term's loss or None, batch_stats, metrics) of `terms` on one domain's batch."""
  losses, metrics = [], {}
  for term in terms:
    loss, batch_stats, term_metrics = term.loss(params, batch_stats, domain_batch, ctx)
    losses.append(loss)
    metrics.update(term_metrics)
  return losses, batch_stats, metrics


def _unlabeled_terms(spec: MethodSpec, terms, params, batch_stats, domain_batch: dict,
                     ctx: DomainContext):
  """`_run_terms` of the unlabeled terms; during the warm-up they are skipped (losses and
  metrics 0, no forward, batch_stats unchanged). ctx.aux["unlabeled_ran"] says which."""
  present = []

  def run(params, batch_stats):
    local = ctx.fork()
    losses, batch_stats, metrics = _run_terms(terms, params, batch_stats, domain_batch, local)
    present[:] = [loss is not None for loss in losses]
    added = {k: v for k, v in local.aux.items() if k not in ctx.aux}  # the unlabeled terms' own
    return [l for l in losses if l is not None], batch_stats, metrics, added

  step = ctx.state["step"]
  if spec.warmup_steps:
    shapes = jax.eval_shape(run, params, batch_stats)

    def skip(params, batch_stats):
      del params
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      return zeros[0], batch_stats, zeros[2], zeros[3]
    ran = step >= spec.warmup_steps
    losses, batch_stats, metrics, aux = jax.lax.cond(ran, run, skip, params, batch_stats)
  else:
    ran = jnp.ones((), bool)
    losses, batch_stats, metrics, aux = run(params, batch_stats)
  ctx.aux.update(aux, unlabeled_ran=ran)
  losses = iter(losses)
  return [next(losses) if p else None for p in present], batch_stats, metrics


def jit_train_step(train_step, mesh: Mesh | None):
  """jit with a replicated state (donated) and a batch sharded over the mesh's data axis."""
  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  replicated = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharding.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
