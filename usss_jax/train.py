"""Universal training: state, the pure train step, and the loop around it.

The train step is built once from the config (`make_train_step`) and is a pure
function `(state, batch) -> (state, metrics)`, jitted with the state replicated
and the batch sharded over the mesh's "data" axis. Every side effect (data,
logging, checkpoints, evaluation) lives in `train_and_evaluate`.

Batch-norm statistics: every forward of the step runs in train mode on its own
batch, as the reference does: one forward per domain for the labeled images and
one for the unlabeled images, each normalised with the statistics of that batch
(global over all devices: under jit, XLA all-reduces the moments of a
batch-sharded array, i.e. synchronised BN, unlike the reference's per-GPU
DataParallel statistics). The running averages are updated after each forward in
a fixed order (domains in `domain_names` order, labeled then unlabeled), so they
see every forward. Domains frozen by method "single" run in eval mode and do
not touch the statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from usss_jax import losses
from usss_jax.models import universal

METHODS = ("single", "basic", "cross", "full", "ser")
PyTree = Any


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


# ---------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class LossSpec:
  """What the step computes, resolved from the config (static under jit)."""
  method: str
  alpha: float
  beta: float
  ser_weight: float
  trained_domains: tuple[bool, ...]  # False: head trained on the frozen encoder ("single")
  temperature: float = 1.0
  normalize_pixels: bool = False
  embeddings_per_class: int = 1
  prototype_reduction: str = "none"
  ema_theta: float = 0.0

  @property
  def uses_unlabeled(self) -> bool:
    return self.method == "ser" or (self.method in ("cross", "full") and
                                    (self.alpha != 0 or self.beta != 0))

  @property
  def uses_label_embeddings(self) -> bool:
    return self.method in ("cross", "full")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key for values that cannot work."""
  if config.method not in METHODS:
    raise ConfigError(f"config.method={config.method!r}: expected one of {METHODS}")
  if not config.domain_names:
    raise ConfigError("config.domain_names is empty: name at least one domain")
  for name in config.domain_names:
    if name not in config.domains:
      raise ConfigError(f"config.domain_names names {name!r}, which is not in config.domains "
                        f"(known: {sorted(config.domains.keys())})")
    crop = tuple(config.domains[name].crop)
    if len(crop) != 2 or min(crop) <= 0:
      raise ConfigError(f"config.domains.{name}.crop={crop}: expected (height, width)")
  if config.method == "single" and config.single_domain and \
      config.single_domain not in config.domain_names:
    raise ConfigError(f"config.single_domain={config.single_domain!r} is not in "
                      f"config.domain_names={tuple(config.domain_names)}")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.dtype={config.dtype!r}: expected 'float32' or 'bfloat16'")
  if config.upsample not in ("transposed", "resize"):
    raise ConfigError(f"config.upsample={config.upsample!r}: expected 'transposed' or 'resize'")
  if config.miou_convention not in ("standard", "reference"):
    raise ConfigError(f"config.miou_convention={config.miou_convention!r}: "
                      "expected 'standard' or 'reference'")
  if config.prototype_reduction not in ("none", "max", "logsumexp"):
    raise ConfigError(f"config.prototype_reduction={config.prototype_reduction!r}")
  if config.label_embeddings.source not in ("pretrain", "file", "random"):
    raise ConfigError(f"config.label_embeddings.source={config.label_embeddings.source!r}: "
                      "expected pretrain | file | random")
  if config.embedding_dim <= 0 and config.method in ("cross", "full"):
    raise ConfigError(f"config.embedding_dim={config.embedding_dim}: method "
                      f"{config.method!r} needs the entropy module")
  n_dev = jax.device_count()
  for key in ("labeled_batch", "unlabeled_batch", "eval_batch"):
    value = config[key]
    if value < 0 or (value > 0 and value % n_dev):
      raise ConfigError(f"config.{key}={value} must be a multiple of the {n_dev} devices")
  if config.labeled_batch == 0:
    raise ConfigError("config.labeled_batch must be positive")
  for key in ("total_steps", "eval_every", "checkpoint_every", "log_every"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be positive")


def loss_spec_from_config(config: ml_collections.ConfigDict) -> LossSpec:
  names = tuple(config.domain_names)
  method = config.method
  alpha, beta = float(config.alpha), float(config.beta)
  if method in ("single", "basic", "ser"):
    alpha = beta = 0.0
  elif method == "cross":
    beta = 0.0
  trained = tuple(True for _ in names)
  if method == "single":
    source = config.single_domain or names[0]
    trained = tuple(n == source for n in names)
  return LossSpec(
      method=method, alpha=alpha, beta=beta,
      ser_weight=float(config.ser_weight) if method == "ser" else 0.0,
      trained_domains=trained, temperature=float(config.temperature),
      normalize_pixels=bool(config.normalize_pixels),
      embeddings_per_class=int(config.embeddings_per_class),
      prototype_reduction=config.prototype_reduction,
      ema_theta=float(config.label_embeddings.ema_theta))


def make_model(config: ml_collections.ConfigDict, num_classes: Sequence[int]):
  return universal.UniversalSegmenter(
      encoder=config.encoder,
      encoder_channels=tuple(config.encoder_channels) or None,
      num_classes=tuple(int(c) for c in num_classes),
      embedding_dim=int(config.embedding_dim),
      upsample=config.upsample,
      conv_weight_grad=config.conv_weight_grad,
      dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32)


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


# ---------------------------------------------------------------------------- state

def init_rng(seed: int) -> jax.Array:
  """The parameter-initialisation key.

  The "rbg" generator compiles the many random draws of a DRN init in seconds
  where the default threefry takes tens of seconds on CPU; it is deterministic
  for a given seed and backend.
  """
  return jax.random.key(seed, impl="rbg")


def init_state(model, tx, rng: jax.Array, input_hw: tuple[int, int],
               label_embeddings: Sequence[jax.Array]) -> dict:
  """Builds the train state dict.

  Returns:
    {"params", "batch_stats", "opt_state", "step": int32 scalar,
     "label_embeddings": tuple of [M_d, D] float32}.
  """
  dummy = jnp.zeros((1, *input_hw, 3), jnp.float32)
  variables = model.init(rng, dummy, train=False)
  params = variables["params"]
  return {
      "params": params,
      "batch_stats": variables.get("batch_stats", {}),
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "label_embeddings": tuple(jnp.asarray(e, jnp.float32) for e in label_embeddings),
  }


# ---------------------------------------------------------------------------- step

def _freeze_encoder(params: dict) -> dict:
  return {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}


def _ema_update(embeddings, pixel_emb, labels, spec: LossSpec):
  from usss_jax import embeddings as emb_lib  # local: only needed with EMA on
  d = pixel_emb.shape[-1]
  flat = jax.lax.stop_gradient(pixel_emb.astype(jnp.float32)).reshape(-1, d)
  lab = labels.reshape(-1)
  valid = lab != losses.IGNORE_LABEL
  return emb_lib.ema_update_centroids(embeddings, flat, jnp.where(valid, lab, 0), valid,
                                      spec.ema_theta, spec.embeddings_per_class)


def make_train_step(model, tx, spec: LossSpec, domain_names: Sequence[str]):
  """Returns the pure step `(state, batch) -> (state, metrics)`.

  Args:
    model: a UniversalSegmenter.
    tx: the optax transformation.
    spec: what to compute (method, weights, entropy options).
    domain_names: head order; batch keys.
  The batch is {name: {"labeled": {"image": [B,h,w,3], "label": [B,h,w]},
  "unlabeled": {"image": [B_u,h,w,3]}}} (unlabeled only when the method uses it).
  Metrics: "loss", per domain "supervised/<name>", "within/<name>", "cross/<name>",
  "ser/<name>".
  """
  domain_names = tuple(domain_names)
  entropy_kwargs = dict(temperature=spec.temperature, normalize_pixels=spec.normalize_pixels,
                        embeddings_per_class=spec.embeddings_per_class,
                        prototype_reduction=spec.prototype_reduction)
  ema = spec.ema_theta > 0 and spec.uses_label_embeddings

  def loss_fn(params, state, batch):
    batch_stats = state["batch_stats"]
    label_embeddings = state["label_embeddings"]
    metrics, sup, cross, within, ser = {}, [], [], [], []
    ema_inputs = []
    for d, name in enumerate(domain_names):
      lab = batch[name]["labeled"]
      trained = spec.trained_domains[d]
      p = params if trained else _freeze_encoder(params)
      variables = {"params": p, "batch_stats": batch_stats}
      if trained:
        out, updates = model.apply(variables, lab["image"], train=True, domain=d,
                                   embedding=ema, mutable=["batch_stats"])
        # Running statistics are data, not a path for gradients (a later eval-mode
        # forward would otherwise backpropagate into the encoder through them).
        batch_stats = jax.lax.stop_gradient(updates["batch_stats"])
      else:
        out = model.apply(variables, lab["image"], train=False, domain=d)
      sup_d = losses.pixel_cross_entropy(out["logits"], lab["label"])
      sup.append(sup_d)
      metrics[f"supervised/{name}"] = sup_d
      if ema:
        ema_inputs.append((out["embedding"], lab["label"]))
      if not spec.uses_unlabeled or "unlabeled" not in batch[name]:
        continue
      images = batch[name]["unlabeled"]["image"]
      use_ser = spec.method == "ser"
      # Dot-product scores are computed at the encoder's resolution and upsampled (exact: the
      # upsampler is linear); cosine scores need the upsampled embedding.
      low_res = not spec.normalize_pixels
      out, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                 train=True, domain=d, logits=use_ser, embedding=not use_ser,
                                 upsample_embedding=not low_res, mutable=["batch_stats"])
      batch_stats = jax.lax.stop_gradient(updates["batch_stats"])
      if use_ser:
        ser_d = losses.decoder_softmax_entropy(out["logits"])
        ser.append(ser_d)
        metrics[f"ser/{name}"] = ser_d
        continue
      upsample = (functools.partial(model.upsample_scores, out_size=images.shape[1:3])
                  if low_res else None)
      if spec.alpha != 0 and len(domain_names) > 1:
        c = losses.cross_domain_entropy(out["embedding"], label_embeddings, d, **entropy_kwargs,
                                        upsample=upsample)
        cross.append(c)
        metrics[f"cross/{name}"] = c
      if spec.beta != 0:
        w = losses.within_domain_entropy(out["embedding"], label_embeddings, d, **entropy_kwargs,
                                         upsample=upsample)
        within.append(w)
        metrics[f"within/{name}"] = w
    total = losses.total_loss(sup, cross, within, alpha=spec.alpha, beta=spec.beta)
    if ser:
      total = total + spec.ser_weight * sum(ser)
    metrics["loss"] = total
    return total, (batch_stats, metrics, ema_inputs)

  def train_step(state, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (batch_stats, metrics, ema_inputs)), grads = grad_fn(state["params"], state, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    label_embeddings = state["label_embeddings"]
    if ema_inputs:
      label_embeddings = tuple(
          _ema_update(e, pix, lab, spec) for e, (pix, lab) in zip(label_embeddings, ema_inputs))
    metrics["grad_norm"] = optax.global_norm(grads)
    new_state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state,
                 "step": state["step"] + 1, "label_embeddings": label_embeddings}
    return new_state, metrics

  return train_step


def jit_train_step(train_step, mesh, data_axis: str = "data"):
  """jit with a replicated state (donated) and a batch sharded over `data_axis`."""
  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(data_axis))
  return jax.jit(train_step, in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------------------- loop

@dataclasses.dataclass
class Domain:
  """A domain's reader, data split and evaluation examples, resolved from the config."""
  name: str
  config: ml_collections.ConfigDict
  reader: Any
  labeled: list
  unlabeled: list
  eval_examples: list

  @property
  def num_classes(self) -> int:
    return self.reader.spec.num_classes


def build_domains(config: ml_collections.ConfigDict, workdir: str) -> list[Domain]:
  """Readers, reproducible labeled/unlabeled splits (written to <workdir>/splits)."""
  from usss_jax.data import demo, registry, splits
  out = []
  for name in config.domain_names:
    dc = config.domains[name]
    if dc.get("generate_demo", False):
      demo.ensure_demo_data(os.path.dirname(os.path.abspath(os.path.expanduser(dc.root))))
    options = dc.options.to_dict() if "options" in dc else {}
    reader = registry.get_reader(dc.dataset, dc.root, **options)
    train_examples = reader.list_examples(dc.train_split)
    split = splits.load_or_make_split(
        train_examples, os.path.join(workdir, "splits"), name, config.num_labeled, config.seed,
        unlabeled_includes_labeled=config.unlabeled_includes_labeled)
    eval_examples = reader.list_examples(dc.eval_split) if dc.eval_split else []
    for split_name, files in (getattr(reader, "skipped", None) or {}).items():
      if files:  # only with options.skip_unpaired=True; otherwise unpaired files are errors
        print(f"{name}: skipped {len(files)} unpaired file(s) in split {split_name!r}, "
              f"e.g. {files[0]}", file=sys.stderr)
    if config.eval_max_examples > 0:
      eval_examples = eval_examples[:config.eval_max_examples]
    out.append(Domain(name, dc, reader, split.labeled, split.unlabeled, eval_examples))
  return out


def _stream_configs(domains: Sequence[Domain]):
  from usss_jax.data import pipeline
  return [pipeline.DomainStreamConfig(
      name=d.name, labeled=d.labeled, unlabeled=d.unlabeled, reader=d.reader,
      crop_hw=tuple(d.config.crop), resize_hw=tuple(d.config.resize) or None,
      scale_range=tuple(d.config.scale_range), flip=bool(d.config.flip)) for d in domains]


def _eval_domains(domains: Sequence[Domain]):
  from usss_jax import evaluate
  return [evaluate.EvalDomain(d.name, i, d.reader, d.eval_examples,
                              tuple(d.config.get("eval_resize", ())))
          for i, d in enumerate(domains) if d.eval_examples]


def load_pretrained_encoder(config, model, state: dict) -> dict:
  """Replaces the encoder's variables with converted ImageNet DRN weights."""
  from usss_jax import convert
  encoder = model.make_encoder() if hasattr(model, "make_encoder") else None
  if encoder is None:
    from usss_jax.models import drn
    encoder = drn.make_encoder(config.encoder, tuple(config.encoder_channels) or None)
  converted = convert.drn_variables_from_torch(convert.load_state_dict(config.pretrained), encoder)
  params = dict(state["params"])
  params["encoder"] = jax.tree.map(jnp.asarray, converted["params"])
  batch_stats = dict(state["batch_stats"])
  batch_stats["encoder"] = jax.tree.map(jnp.asarray, converted["batch_stats"])
  return {**state, "params": params, "batch_stats": batch_stats}


def prepare_label_embeddings(config, workdir: str, domains: Sequence[Domain]) -> list[np.ndarray]:
  """[C_d * K, D] label embeddings per domain, computed once and saved in the workdir."""
  from usss_jax import embedding_stage, embeddings as emb_lib
  k, dim = int(config.embeddings_per_class), int(config.embedding_dim)
  source = config.label_embeddings.source
  out_dir = embedding_stage.embeddings_dir(workdir)
  result = []
  for i, d in enumerate(domains):
    if source == "random":
      result.append(embedding_stage.random_embeddings(d.num_classes, k, dim, config.seed + i))
      continue
    if source == "file":
      paths = embedding_stage._external_paths(config.label_embeddings.file, config.domain_names)
      result.append(embedding_stage._load_external(paths[d.name], d.name, d.num_classes, k, dim))
      continue
    path = os.path.join(out_dir, f"{d.name}.npz")
    if os.path.exists(path):
      loaded = emb_lib.LabelEmbeddings.load(path)
      result.append(np.asarray(loaded.embeddings, np.float32))
      continue
    sub_workdir = config.label_embeddings.pretrain_checkpoint or os.path.join(
        out_dir, f"pretrain_{d.name}")
    sub_config = embedding_stage.pretrain_config(config, d.name)
    logging.info("label embeddings of %s: supervised pre-training in %s", d.name, sub_workdir)
    state, _, model, _ = run_training(sub_config, sub_workdir, run_eval=False,
                                      log_prefix=f"[embed {d.name}] ")
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    computed = embedding_stage.compute_for_domain(config, model, variables, d)
    computed.source = f"pretrain:{sub_workdir}"
    if jax.process_index() == 0:
      computed.save(path)
    result.append(np.asarray(computed.embeddings, np.float32))
  return result


def _placeholder_embeddings(config, domains) -> list[np.ndarray]:
  dim = max(int(config.embedding_dim), 1)
  return [np.zeros((d.num_classes * int(config.embeddings_per_class), dim), np.float32)
          for d in domains]


def _fetch_metrics(pending: list) -> tuple[dict, list]:
  """Host copies of the metrics of the steps since the last log."""
  host = jax.device_get(pending)
  return host[-1][1], host


def run_training(config: ml_collections.ConfigDict, workdir: str, *, run_eval: bool = True,
                 log_prefix: str = "") -> tuple[dict, dict, Any, list[Domain]]:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates.

  Returns:
    (final state, last evaluation results or {}, model, domains).
  """
  from usss_jax import checkpoint as ckpt_lib, evaluate, metric_writers
  from usss_jax.data import pipeline
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    _write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

  # Opened first so that a bad checkpoint directory fails before any compilation.
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints)
  domains = build_domains(config, workdir)
  names = [d.name for d in domains]
  model = make_model(config, [d.num_classes for d in domains])
  tx, schedule = make_optimizer(config)
  spec = loss_spec_from_config(config)
  mesh = pipeline.make_mesh()
  replicated = NamedSharding(mesh, P())

  if spec.uses_label_embeddings:
    label_embeddings = prepare_label_embeddings(config, workdir, domains)
  else:
    label_embeddings = _placeholder_embeddings(config, domains)

  crop = tuple(domains[0].config.crop)
  init_fn = functools.partial(init_state, model, tx, input_hw=crop,
                              label_embeddings=tuple(label_embeddings))
  state = jax.jit(init_fn, out_shardings=replicated)(init_rng(config.seed))
  if config.pretrained:
    state = jax.device_put(load_pretrained_encoder(config, model, state), replicated)
  if is_main and not log_prefix:
    from clu import parameter_overview
    logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(state["params"]))

  train_input = pipeline.TrainInput(
      _stream_configs(domains), labeled_batch=config.labeled_batch,
      unlabeled_batch=config.unlabeled_batch if spec.uses_unlabeled else 0,
      seed=config.seed, mesh=mesh, normalization=config.normalization,
      worker_count=config.workers, cache_mb=config.data_cache_mb)
  start_step = 0
  latest = checkpointer.latest_step()
  if latest is not None:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, extra = checkpointer.restore(abstract, latest)
    train_input.set_state(extra["data"])
    start_step = int(jax.device_get(state["step"]))
    logging.info("%sresumed from %s at step %d", log_prefix, checkpointer.directory, start_step)

  step_fn = jit_train_step(make_train_step(model, tx, spec, names), mesh)
  writer = metric_writers.MetricWriter(workdir, enabled=is_main)
  if start_step == 0:
    writer.write_hparams(json.loads(config.to_json()))
  progress = metric_writers.ProgressBar(config.total_steps, initial_step=start_step)
  eval_domains = _eval_domains(domains) if run_eval else []
  results: dict = {}

  def run_eval_now(step):
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    res = evaluate.evaluate_domains(model, variables, eval_domains,
                                    batch_size=config.eval_batch,
                                    normalization=config.normalization,
                                    miou_convention=config.miou_convention)
    writer.write_eval(step, _eval_summary(res, names))
    line = " ".join(f"{n}={res[n]['miou']:.4f}" for n in names if n in res)
    print(f"{log_prefix}eval step {step}: mIoU {line} mean={res['mean_miou']:.4f}", flush=True)
    checkpointer.save_best(step, state, extra={"data": train_input.get_state()},
                           metric_value=res["mean_miou"])
    return res

  pending = []
  last_log_time, last_log_step = time.time(), start_step
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = next(train_input)
      state, step_metrics = step_fn(state, batch)
      pending.append((step, step_metrics))
      is_last = step == config.total_steps
      do_ckpt = step % config.checkpoint_every == 0 or is_last
      do_eval = eval_domains and (step % config.eval_every == 0 or is_last)
      if step % config.log_every == 0 or do_ckpt or do_eval:
        host = jax.device_get(pending)
        pending = []
        for s, m in host:
          metric_writers.check_finite(s, {k: v for k, v in m.items() if k != "grad_norm"})
        now = time.time()
        scalars = {k: float(v) for k, v in host[-1][1].items()}
        scalars["learning_rate"] = float(schedule(step))
        scalars["steps_per_second"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        writer.write_scalars(step, scalars)
        progress.update(step, {"loss": scalars["loss"]})
      if do_ckpt:
        checkpointer.save(step, state, extra={"data": train_input.get_state()})
      if do_eval:
        results = run_eval_now(step)
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    train_input.close()
  if run_eval and not results and eval_domains and start_step >= config.total_steps:
    results = run_eval_now(start_step)
  return state, results, model, domains


def _eval_summary(results: dict, names: Sequence[str]) -> dict:
  """What goes to metrics.jsonl / TensorBoard: mIoU, accuracy and per-class IoU per domain."""
  out = {"mean_miou": results["mean_miou"]}
  for n in names:
    if n in results:
      r = results[n]
      out[n] = {"miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"],
                "iou": {c: v for c, v in r["iou"].items() if v is not None},
                "num_images": r["num_images"]}
  return out


def _write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the last evaluation results."""
  _, results, _, _ = run_training(config, workdir)
  return results
