"""The train state and everything it is made of: model, optimiser, initialisation, restore.

One place builds what training, `Segmenter`, the analyses and the benchmarks all need:

  make_model(config, num_classes)        the UniversalSegmenter of a config
  make_optimizer(config)                 SGD + momentum, coupled weight decay, poly schedule
  initial_state(...)                     params, BN statistics, optimiser state, step, label
                                         embeddings, pretrained encoder, the method's extras
  abstract_state(...)                    its shapes and placement, for restoring
  restore(config, workdir, ...)          a run's best or latest checkpoint

The state is a dict: {"params", "batch_stats", "opt_state", "step": int32 [],
"label_embeddings": tuple of [C_d * K, D] float32, and the method's extras (e.g. "teacher"),
and with Cross Pseudo Supervision "peer": the second network's entries of the same kinds}.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from usss_jax import checkpoint as ckpt_lib
from usss_jax import config as config_lib
from usss_jax import convert, domains, objectives, sharding
from usss_jax.models import drn, layers, universal

PyTree = Any


def make_model(config: ml_collections.ConfigDict,
               num_classes: Sequence[int]) -> universal.UniversalSegmenter:
  """The universal model of `config`: encoder, one head per domain, entropy module."""
  config_lib.check_choice(config, "encoder", drn.ENCODERS)
  config_lib.check_choice(config, "dtype", universal.COMPUTE_DTYPES)
  config_lib.check_choice(config, "upsample", layers.UPSAMPLE_MODES)
  config_lib.check_choice(config, "conv_weight_grad", layers.WEIGHT_GRADS)
  if config.encoder_channels and len(config.encoder_channels) != 8:
    raise config_lib.ConfigError(f"config.encoder_channels={tuple(config.encoder_channels)}: "
                                 "expected 8 widths, or () for the encoder's own")
  return universal.UniversalSegmenter(
      encoder=config.encoder,
      encoder_channels=tuple(config.encoder_channels) or None,
      num_classes=tuple(int(c) for c in num_classes),
      embedding_dim=int(config.embedding_dim),
      upsample=config.upsample,
      conv_weight_grad=config.conv_weight_grad,
      dtype=universal.COMPUTE_DTYPES[config.dtype])


def poly_schedule(base_lr: float, power: float, total_steps: int) -> Callable:
  """lr(t) = base_lr * (1 - t / total_steps) ** power, 0 from total_steps on.

  Written out rather than optax.polynomial_schedule because under jit on XLA:CPU
  `0.0 ** 0.9` evaluates to NaN, which would poison any step past the end.
  """
  def schedule(count):
    # Compare the integer count: XLA may turn "/ total_steps" into a multiplication by
    # its reciprocal, leaving 1 - t/T slightly above 0 at t = T.
    running = count < total_steps
    frac = jnp.where(running, 1.0 - count / total_steps, 1.0)
    return jnp.where(running, base_lr * frac ** power, 0.0)
  return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                               Callable]:
  """SGD with momentum, PyTorch-style coupled weight decay and a per-step poly schedule."""
  schedule = poly_schedule(config.learning_rate, config.poly_power, config.total_steps)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum))
  return tx, schedule


def init_rng(seed: int) -> jax.Array:
  """The parameter-initialisation key.

  The "rbg" generator compiles the many random draws of a DRN init in seconds
  where the default threefry takes tens of seconds on CPU; it is deterministic
  for a given seed and backend.
  """
  return jax.random.key(seed, impl="rbg")


def placeholder_embeddings(config: ml_collections.ConfigDict,
                           num_classes: Sequence[int]) -> list[np.ndarray]:
  """Zero label embeddings of the state's shape, for methods that do not use them."""
  dim = max(int(config.embedding_dim), 1)
  return [np.zeros((c * int(config.embeddings_per_class), dim), np.float32)
          for c in num_classes]


def model_variables(state: dict) -> dict:
  """The {"params", "batch_stats"} of a train state (what the model's apply takes)."""
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def _model_state(model, tx, rng: jax.Array, input_hw: tuple[int, int],
                 label_embeddings: Sequence[jax.Array]) -> dict:
  dummy = jnp.zeros((1, *input_hw, 3), jnp.float32)
  variables = model.init(rng, dummy, train=False)
  params = variables["params"]
  return {"params": params, "batch_stats": variables.get("batch_stats", {}),
          "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "label_embeddings": tuple(jnp.asarray(e, jnp.float32) for e in label_embeddings)}


def _with_method_state(spec: objectives.MethodSpec, state: dict) -> dict:
  return {**state, **spec.init_state(state["params"], state["batch_stats"])}


def load_pretrained_encoder(config: ml_collections.ConfigDict, state: dict) -> dict:
  """Replaces the encoder's variables with converted DRN weights (`config.pretrained`)."""
  encoder = drn.make_encoder(config.encoder, tuple(config.encoder_channels) or None)
  converted = convert.drn_variables_from_torch(convert.load_state_dict(config.pretrained), encoder)
  params = dict(state["params"])
  params["encoder"] = jax.tree.map(jnp.asarray, converted["params"])
  batch_stats = dict(state["batch_stats"])
  batch_stats["encoder"] = jax.tree.map(jnp.asarray, converted["batch_stats"])
  return {**state, "params": params, "batch_stats": batch_stats}


def load_run(config: ml_collections.ConfigDict, state: dict, workdir: str) -> dict:
  """`state` with the parameters and BN statistics of `workdir`'s latest checkpoint (a run
  with the same domains and model, whatever its method)."""
  num_classes = [state["params"][f"head_{d}"]["kernel"].shape[-1]
                 for d in range(len(config.domain_names))]
  other = config_lib.run_config(workdir)
  _, restored, _ = restore(other, workdir, num_classes,
                           domains.load_label_spaces(workdir)[0].crop_hw, which="latest")
  for key in ("params", "batch_stats"):
    want = jax.tree.map(np.shape, state[key])
    got = jax.tree.map(np.shape, restored[key])
    if want != got:
      raise config_lib.ConfigError(f"config.init_from={workdir}: its model differs from this "
                                   f"run's ({key} of other shapes or names); start from a run "
                                   "of the same domains, encoder and embedding_dim")
  return {**state, "params": restored["params"], "batch_stats": restored["batch_stats"]}


def initial_state(config: ml_collections.ConfigDict, model, tx, spec: objectives.MethodSpec,
                  input_hw: tuple[int, int], label_embeddings: Sequence[np.ndarray],
                  placement: NamedSharding, embedding_projection=None) -> dict:
  """The state at step 0, placed on `placement`: random init (seed `config.seed`), the
  pretrained encoder if `config.pretrained` names one, the model of `config.init_from`'s run if
  given, the entropy module set to `embedding_projection` ((kernel [1, 1, F, D], bias [D]),
  e.g. the PCA of the label embeddings) if given, then the method's extras (a teacher starts as
  a copy of that model; a peer from its own key, `peer_rng`, sharing what was loaded)."""
  init = functools.partial(_model_state, model, tx, input_hw=tuple(input_hw),
                           label_embeddings=tuple(label_embeddings))
  state = jax.jit(init, out_shardings=placement)(init_rng(config.seed))
  if config.pretrained:
    state = jax.device_put(load_pretrained_encoder(config, state), placement)
  if config.get("init_from"):
    state = jax.device_put(load_run(config, state, config.init_from), placement)
  if embedding_projection is not None:
    kernel, bias = (jnp.asarray(x, jnp.float32) for x in embedding_projection)
    if kernel.shape != state["params"]["embedding"]["kernel"].shape:
      raise config_lib.ConfigError(
          f"the label embeddings' projection {kernel.shape} does not fit the entropy module "
          f"{state['params']['embedding']['kernel'].shape} (config.embedding_dim)")
    params = {**state["params"], "embedding": {"kernel": kernel, "bias": bias}}
    state = jax.device_put({**state, "params": params}, placement)
  state = jax.jit(functools.partial(_with_method_state, spec), out_shardings=placement)(state)
  if spec.trains_peer:
    peer = jax.jit(init, out_shardings=placement)(peer_rng(config.seed))
    loaded = bool(config.pretrained or config.get("init_from"))
    take = functools.partial(_initial_peer, spec, loaded, embedding_projection is not None)
    state = {**state, objectives.PEER: jax.jit(take, out_shardings=placement)(peer, state)}
  return state


def peer_rng(seed: int) -> jax.Array:
  """The initialisation key of Cross Pseudo Supervision's second network."""
  return jax.random.fold_in(init_rng(seed), 1)


def _initial_peer(spec: objectives.MethodSpec, loaded: bool, projected: bool, peer: dict,
                  state: dict) -> dict:
  """The peer's state at step 0: its own random initialisation, except the parts the model
  loaded (the encoder of a pretrained / init_from start, the projection of the entropy
  module), which both networks start from; the heads always differ."""
  params, batch_stats = dict(peer["params"]), dict(peer["batch_stats"])
  if loaded:
    params["encoder"] = state["params"]["encoder"]
    batch_stats["encoder"] = state["batch_stats"]["encoder"]
  if projected:
    params["embedding"] = state["params"]["embedding"]
  peer = {**peer, "params": params, "batch_stats": batch_stats}
  peer = _with_method_state(spec, peer)
  # Copies: the step donates the state, and a buffer must not be donated twice.
  return jax.tree.map(jnp.copy, {k: v for k, v in peer.items() if k != "step"})


def abstract_state(config: ml_collections.ConfigDict, model, tx, spec: objectives.MethodSpec,
                   input_hw: tuple[int, int], num_classes: Sequence[int],
                   placement: NamedSharding) -> PyTree:
  """ShapeDtypeStructs (with `placement`) of the state `initial_state` makes: what a
  checkpoint of the run restores into."""
  def init(rng):
    state = _with_method_state(spec, _model_state(model, tx, rng, tuple(input_hw),
                                                  placeholder_embeddings(config, num_classes)))
    if spec.trains_peer:  # the peer's entries have the model's shapes
      state[objectives.PEER] = {k: v for k, v in state.items() if k != "step"}
    return state
  return sharding.abstract_like(jax.eval_shape(init, init_rng(0)), placement)


def restore(config: ml_collections.ConfigDict, workdir: str, num_classes: Sequence[int],
            input_hw: tuple[int, int], *, which: str = "best",
            placement: NamedSharding | None = None) -> tuple[Any, dict, int]:
  """(model, train state, step) of `workdir`'s best (else latest) or latest checkpoint.

  Needs no dataset: the state's shapes follow from the config, the classes per domain and
  the training crop.

  Args:
    which: "best" (falls back to the latest when no best exists) or "latest".
    placement: where the restored arrays go; default replicated over all devices.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ckpt_lib.CheckpointError(f"{ckpt_dir}: no checkpoint directory; train first "
                                   f"(python launch.py --config=... --workdir={workdir})")
  model = make_model(config, num_classes)
  tx, _ = make_optimizer(config)
  placement = placement or sharding.replicated(sharding.make_mesh())
  abstract = abstract_state(config, model, tx, objectives.method_spec(config), input_hw,
                            num_classes, placement)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints,
                                       read_only=True)
  try:
    best = which == "best" and bool(checkpointer.all_steps(best=True))
    if not best and checkpointer.latest_step() is None:
      raise ckpt_lib.CheckpointError(f"{ckpt_dir}: holds no checkpoint")
    state, _ = checkpointer.restore(abstract, best=best)
  finally:
    checkpointer.close()
  return model, state, int(jax.device_get(state["step"]))
