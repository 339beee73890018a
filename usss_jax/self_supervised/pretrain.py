"""Dense contrastive pretraining of the shared encoder on every domain's unlabeled images.

  python -m usss_jax.self_supervised --config=configs/camvid_iddlite.py:validation \\
      --workdir=runs/ssl/base --config.self_supervised.steps=2000

then fine-tune with `launch.py ... --config.pretrained=runs/ssl/base/encoder.npz`, or let a
training run do both: with `config.self_supervised.steps` > 0 it pretrains first, in
`<workdir>/self_supervised/` (`usss_jax.self_supervised_stage`).

Per step, B images of every domain (`data.ViewPairStream`: training images minus the
validation hold-out, labels never read) give two views each; per domain one train-mode forward
of both views (encoder + projection head, BN statistics of that domain's batch, as the
segmentation step computes them per domain), then one symmetric dense InfoNCE over all cells of
all domains (`dense_contrastive.dense_contrastive_loss`). The encoder (params and BN running
statistics) is written in the torch state-dict layout that `--config.pretrained` reads; the
projection head is dropped.

Outputs in the workdir: `encoder.npz`, `metrics.jsonl` (one JSON line per logged step: step,
loss, accuracy = fraction of cells whose nearest cell of the other view is their positive,
positive_similarity, overlap, learning_rate, seconds), `pretrain.json` (config and options).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from usss_jax import checkpoint as ckpt_lib
from usss_jax import convert, files, metric_writers
from usss_jax import domains as domains_lib
from usss_jax import state as state_lib
from usss_jax import workdir as workdir_lib
from usss_jax.models import drn
from usss_jax.self_supervised import data as data_lib
from usss_jax.self_supervised import dense_contrastive

ENCODER_FILE = "encoder.npz"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class PretrainOptions:
  """Hyper-parameters of the pretraining (the encoder, data and crops come from the config).

  Attributes:
    steps: optimisation steps.
    batch_per_domain: images per domain and step (each gives two views).
    learning_rate: peak learning rate (linear warm-up, then cosine decay to 0).
    warmup_steps: of the linear warm-up.
    optimizer: "sgd" (momentum, coupled weight decay, as the segmentation training) or "adamw".
    momentum: SGD momentum.
    weight_decay: coupled (SGD) or decoupled (AdamW) weight decay.
    temperature: InfoNCE temperature of the cosine similarities.
    exclude_radius: same-image cells within this many cells of a positive are not negatives
      (`dense_contrastive.dense_contrastive_loss`; 0 = all cells are).
    projection_hidden, projection_dim: widths of the projection head.
    max_shift_cells: largest cell offset (dy, dx) between the two views.
    scale_range: random scale of the views; None = each domain's training scale_range.
    seed: data order, views and initialisation.
    log_every: steps between metric lines.
  """
  steps: int = 2000
  batch_per_domain: int = 8
  learning_rate: float = 0.05
  warmup_steps: int = 100
  optimizer: str = "sgd"
  momentum: float = 0.9
  weight_decay: float = 1e-4
  temperature: float = 0.2
  exclude_radius: int = 0
  projection_hidden: int = 128
  projection_dim: int = 64
  max_shift_cells: tuple[int, int] = (3, 4)
  scale_range: tuple[float, float] | None = None
  seed: int = 0
  log_every: int = 50

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "PretrainOptions":
    """The options of `config.self_supervised` (seed: `config.seed`)."""
    c = config.self_supervised
    return cls(steps=int(c.steps), batch_per_domain=int(c.batch_per_domain),
               learning_rate=float(c.learning_rate), warmup_steps=int(c.warmup_steps),
               optimizer=c.optimizer, momentum=float(c.momentum),
               weight_decay=float(c.weight_decay), temperature=float(c.temperature),
               exclude_radius=int(c.exclude_radius),
               projection_hidden=int(c.projection_hidden), projection_dim=int(c.projection_dim),
               max_shift_cells=tuple(int(v) for v in c.max_shift_cells),
               scale_range=tuple(float(v) for v in c.scale_range) or None,
               seed=int(config.seed), log_every=int(c.log_every))

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if self.log_every < 1:
      raise ValueError(f"log_every must be >= 1, got {self.log_every}")


class DenseContrastiveModel(nn.Module):
  """DRN-D encoder (variables under "encoder", as in UniversalSegmenter) + projection head.

  x [B, H, W, 3] -> [B, ceil(H/8), ceil(W/8), projection_dim] unit vectors.
  """
  encoder: str = "drn_d_22"
  encoder_channels: tuple[int, ...] | None = None
  projection_hidden: int = 128
  projection_dim: int = 64
  conv_weight_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = drn.make_encoder(self.encoder, self.encoder_channels, module_name="encoder",
                                weight_grad=self.conv_weight_grad)(x, train)
    return dense_contrastive.ProjectionHead(self.projection_hidden, self.projection_dim,
                                            name="projection")(features, train)


def encoder_channels(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
  return tuple(config.encoder_channels) or None


def make_model(config: ml_collections.ConfigDict, options: PretrainOptions
               ) -> DenseContrastiveModel:
  return DenseContrastiveModel(encoder=config.encoder, encoder_channels=encoder_channels(config),
                               projection_hidden=options.projection_hidden,
                               projection_dim=options.projection_dim,
                               conv_weight_grad=config.conv_weight_grad)


def make_optimizer(options: PretrainOptions) -> tuple[optax.GradientTransformation, Callable]:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=options.learning_rate,
      warmup_steps=min(options.warmup_steps, options.steps - 1),
      decay_steps=options.steps, end_value=0.0)
  if options.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(options.weight_decay),
                     optax.sgd(schedule, momentum=options.momentum))
  else:
    tx = optax.adamw(schedule, weight_decay=options.weight_decay)
  return tx, schedule


def init_state(model: DenseContrastiveModel, tx: optax.GradientTransformation, seed: int,
               input_hw: tuple[int, int]) -> dict:
  """{"params", "batch_stats", "opt_state", "step"}."""
  variables = model.init(state_lib.init_rng(seed), jnp.zeros((1, *input_hw, 3), jnp.float32),
                         train=False)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"],
          "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}


def make_step(model: DenseContrastiveModel, tx: optax.GradientTransformation,
              domain_names: Sequence[str], temperature: float, exclude_radius: int = 0):
  """The pure step `(state, batch) -> (state, metrics)` over a `ViewPairStream` batch."""
  domain_names = tuple(domain_names)

  def loss_fn(params, batch_stats, batch):
    z1s, z2s, offsets = [], [], []
    for name in domain_names:
      views = batch[name]
      b = views["view_1"].shape[0]
      both = jnp.concatenate([views["view_1"], views["view_2"]], axis=0)
      z, updates = model.apply({"params": params, "batch_stats": batch_stats}, both,
                               train=True, mutable=["batch_stats"])
      # Running statistics are data, not a path for gradients.
      batch_stats = jax.lax.stop_gradient(updates["batch_stats"])
      z1s.append(z[:b])
      z2s.append(z[b:])
      offsets.append(views["offsets"])
    loss, metrics = dense_contrastive.dense_contrastive_loss(z1s, z2s, offsets, temperature,
                                                             exclude_radius)
    return loss, (batch_stats, metrics)

  def step(state, batch):
    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
    return ({"params": params, "batch_stats": batch_stats, "opt_state": opt_state,
             "step": state["step"] + 1}, metrics)

  return step


def encoder_state_dict(config: ml_collections.ConfigDict, state: dict) -> dict[str, np.ndarray]:
  """The encoder's params and BN statistics as a torch-layout DRN state dict."""
  encoder = drn.make_encoder(config.encoder, encoder_channels(config))
  variables = {"params": state["params"]["encoder"],
               "batch_stats": state["batch_stats"]["encoder"]}
  return convert.drn_variables_to_torch(jax.device_get(variables), encoder)


def jsonable(options: PretrainOptions) -> dict[str, Any]:
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(options).items()}


def check_recorded_options(workdir: str, options: PretrainOptions, subject: str = "") -> None:
  """Raises ValueError, naming pretrain.json and the fix, if the pretraining in `workdir` (its
  encoder or checkpoint: `subject`) ran with other options than `options`."""
  record_path = os.path.join(workdir, "pretrain.json")
  recorded = (files.read_json(record_path).get("options") if os.path.exists(record_path)
              else "unrecorded")
  if recorded != jsonable(options):
    raise ValueError(
        f"{record_path}: {subject}pretrained with other options ({recorded}) than "
        f"config.self_supervised asks for; restore them, or remove {workdir} to pretrain again")


def pretrain(config: ml_collections.ConfigDict, workdir: str, options: PretrainOptions,
             domains: Sequence[domains_lib.Domain], *,
             log: Callable[[str], None] = logging.getLogger("usss_jax").info) -> dict:
  """Runs the pretraining; writes encoder.npz, metrics.jsonl and pretrain.json in `workdir`.

  `domains` are the run's (`domains.build_domains`); their labeled and unlabeled pools are the
  images (labels unread). Every `config.checkpoint_every` steps the state and the data stream's
  position are saved in `workdir/checkpoints`; an interrupted pretraining with the same options
  resumes from there to the same encoder as an uninterrupted one.

  Returns:
    {"encoder": path of encoder.npz, "metrics": the last logged metrics,
     "images": {domain: number of pretraining images}, "seconds": wall time}.
  """
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  domains = data_lib.unlabeled_domains(domains, max_shift_cells=options.max_shift_cells,
                                       scale_range=options.scale_range)
  images = {d.name: len(d.examples) for d in domains}
  log(f"pretraining on {images} unlabeled training images (hold-outs excluded)")
  record_path = os.path.join(workdir, "pretrain.json")
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=1,
                                       keep_best=False)
  resume_step = checkpointer.latest_step()
  if resume_step is not None:
    check_recorded_options(workdir, options, f"the checkpoint at step {resume_step} was ")
  files.write_json(record_path, {"options": jsonable(options), "images": images,
                                 "config": json.loads(config.to_json())})
  model = make_model(config, options)
  tx, schedule = make_optimizer(options)
  state = init_state(model, tx, options.seed, domains[0].view_config.crop_hw)
  step_fn = jax.jit(make_step(model, tx, [d.name for d in domains], options.temperature,
                              options.exclude_radius), donate_argnums=(0,))
  stream = data_lib.ViewPairStream(domains, options.batch_per_domain, options.seed,
                                   normalization=config.normalization)
  if resume_step is not None:
    state, extra = checkpointer.restore(state)
    stream.set_state(extra["stream"])
    log(f"resuming the pretraining at step {resume_step}")
  first = 1 if resume_step is None else resume_step + 1
  metrics_path = os.path.join(workdir, METRICS_FILE)
  # The lines of steps that run again (or of an earlier start without a checkpoint) go.
  metric_writers.prepare_for_resume(metrics_path, resume_step or 0)
  kept = metric_writers.read_records(metrics_path) if os.path.exists(metrics_path) else []
  last: dict[str, float] = kept[-1] if kept else {}
  with open(metrics_path, "a", encoding="utf-8") as metrics_file:
    batches = iter(stream)
    try:
      for step in range(first, options.steps + 1):
        state, metrics = step_fn(state, next(batches))
        workdir_lib.note_training_step()  # a later failure keeps the workdir
        if step % options.log_every == 0 or step == options.steps:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not np.isfinite(values["loss"]):
            raise FloatingPointError(f"step {step}: the contrastive loss is {values['loss']}")
          last = {"step": step, **values, "learning_rate": float(schedule(step - 1)),
                  "seconds": round(time.time() - start, 1)}
          metrics_file.write(json.dumps(last) + "\n")
          metrics_file.flush()
          log(f"step {step}: loss {values['loss']:.4f} accuracy {values['accuracy']:.3f} "
              f"positive cos {values['positive_similarity']:.3f}")
        stop = workdir_lib.stop_requested()  # SIGTERM / SIGINT: a checkpoint, then Stopped
        if stop or (step % config.checkpoint_every == 0 and step < options.steps):
          checkpointer.save(step, state, extra={"stream": stream.get_state()})
        if stop:
          raise workdir_lib.Stopped(step, stop)
    finally:
      batches.close()
      checkpointer.close()
  path = os.path.join(workdir, ENCODER_FILE)
  # Written last and atomically: its presence means a finished pretraining (the stage's cache).
  with files.atomic_write(path, "wb") as f:
    np.savez(f, **encoder_state_dict(config, state))
  seconds = time.time() - start
  log(f"wrote {path} ({seconds:.0f} s)")
  return {"encoder": path, "metrics": last, "images": images, "seconds": seconds}
