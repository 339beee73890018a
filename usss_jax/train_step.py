"""The train step: model, optimiser, state, and the pure `(state, batch) -> (state, metrics)`.

The step is built once from the config (`make_train_step`) and jitted with the state
replicated and the batch sharded over the mesh's "data" axis (`jit_train_step`); the loop
around it (`usss_jax.train`) owns every side effect.

Batch-norm statistics: every forward of the step runs in train mode on its own batch, as the
reference does: one forward per domain for the labeled images and one for the unlabeled
images, each normalised with the statistics of that batch (global over all devices: under jit,
XLA all-reduces the moments of a batch-sharded array, i.e. synchronised BN, unlike the
reference's per-GPU DataParallel statistics). The running averages are updated after each
forward in a fixed order (domains in `domain_names` order, labeled then unlabeled), so they see
every forward. Domains frozen by method "single" run in eval mode and do not touch the
statistics.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from usss_jax import convert, inference, losses, sharding
from usss_jax.config import LossSpec
from usss_jax.data.base import IGNORE_LABEL
from usss_jax.label_embeddings import ema
from usss_jax.models import drn, universal

PyTree = Any


def make_model(config: ml_collections.ConfigDict, num_classes: Sequence[int]):
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


def init_state(model, tx, rng: jax.Array, input_hw: tuple[int, int],
               label_embeddings: Sequence[jax.Array], teacher: bool = False) -> dict:
  """Builds the train state dict.

  Returns:
    {"params", "batch_stats", "opt_state", "step": int32 scalar,
     "label_embeddings": tuple of [M_d, D] float32, and with `teacher` "teacher":
     {"params", "batch_stats"} (the EMA teacher, a copy of the model at first)}.
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
      # Copies: the step donates the state, and a buffer must not be donated twice.
      **({"teacher": jax.tree.map(jnp.copy, {"params": params,
                                             "batch_stats": variables.get("batch_stats", {})})}
         if teacher else {}),
  }


def model_variables(state: dict) -> dict:
  """The {"params", "batch_stats"} of a train state (what the model's apply takes)."""
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def placeholder_embeddings(config: ml_collections.ConfigDict,
                           num_classes: Sequence[int]) -> list[np.ndarray]:
  """Zero label embeddings of the state's shape, for methods that do not use them."""
  dim = max(int(config.embedding_dim), 1)
  return [np.zeros((c * int(config.embeddings_per_class), dim), np.float32)
          for c in num_classes]


def load_pretrained_encoder(config, model, state: dict) -> dict:
  """Replaces the encoder's variables with converted ImageNet DRN weights."""
  encoder = drn.make_encoder(config.encoder, tuple(config.encoder_channels) or None)
  converted = convert.drn_variables_from_torch(convert.load_state_dict(config.pretrained), encoder)
  params = dict(state["params"])
  params["encoder"] = jax.tree.map(jnp.asarray, converted["params"])
  batch_stats = dict(state["batch_stats"])
  batch_stats["encoder"] = jax.tree.map(jnp.asarray, converted["batch_stats"])
  return {**state, "params": params, "batch_stats": batch_stats}


def _freeze_encoder(params: dict) -> dict:
  return {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}


def _cell_centre_labels(labels: jax.Array, feature_hw: tuple[int, int]) -> jax.Array:
  """[B, H, W] labels at the centres of the encoder's 8x8 cells: [B, h, w] (padding: ignore)."""
  (h, w), stride = feature_hw, inference.FEATURE_STRIDE
  pad = ((0, 0), (0, h * stride - labels.shape[1]), (0, w * stride - labels.shape[2]))
  padded = jnp.pad(labels, pad, constant_values=IGNORE_LABEL)
  return padded[:, stride // 2::stride, stride // 2::stride]


def make_train_step(model, tx, spec: LossSpec, domain_names: Sequence[str]):
  """Returns the pure step `(state, batch) -> (state, metrics)`.

  Args:
    model: a UniversalSegmenter.
    tx: the optax transformation.
    spec: what to compute (method, weights, alignment, consistency options).
    domain_names: head order; batch keys.
  The batch is {name: {"labeled": {"image": [B,h,w,3], "label": [B,h,w]},
  "unlabeled": {"image": [B_u,h,w,3] (the weak view), and with consistency "strong"
  [B_u,h,w,3], "cutmix_mask" [B_u,h,w] bool, "valid" [B_u,h,w] bool}}} (unlabeled only when
  the method uses it).
  Metrics: "loss", "grad_norm", per domain "supervised/<name>", and as the method computes
  them "within/<name>", "cross/<name>", "ser/<name>", "consistency/<name>", "prototype/<name>",
  plus diagnostics (`_label_embedding_terms`, `_consistency_term`).
  """
  domain_names = tuple(domain_names)
  k = spec.embeddings_per_class
  infomax = spec.alignment == "infomax"
  ema_prototypes = spec.ema_theta > 0 and spec.uses_label_embeddings
  # The labeled forward also gives the pixel embedding (diagnostics; EMA prototypes and the
  # prototype loss learn from it).
  labeled_embedding = spec.uses_label_embeddings

  def forward(variables, images, *, train: bool, **flags):
    """(outputs, batch_stats): running statistics are updated by train-mode forwards."""
    if not train:
      return model.apply(variables, images, train=False, **flags), variables["batch_stats"]
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], **flags)
    # Running statistics are data, not a path for gradients (a later eval-mode forward
    # would otherwise backpropagate into the encoder through them).
    return out, jax.lax.stop_gradient(updates["batch_stats"])

  def scores_of(embedding, prototypes):
    """[B, h, w, D] feature-resolution embedding -> [B, h, w, M or C] prototype scores."""
    scores = losses.label_similarity(embedding, prototypes, temperature=spec.temperature,
                                     normalize_pixels=infomax or spec.normalize_pixels)
    return losses.reduce_prototypes(scores, k, spec.prototype_reduction)

  def label_embedding_terms(embedding, label_embeddings, d, out_hw, metrics, name):
    """(cross, within) for an unlabeled batch of domain d, and their diagnostics."""
    metrics[f"embedding_norm/{name}"] = jnp.mean(jnp.linalg.norm(
        embedding.astype(jnp.float32), axis=-1))
    others = [e for j, e in enumerate(label_embeddings) if j != d]
    if infomax:
      # Every encoder cell is a pixel; E[H(p)] over confident cells, H(E[p]) over all.
      def im(prototypes):
        scores = scores_of(embedding, prototypes)
        confident = None
        if spec.alignment_threshold > 0:
          confident = jnp.max(jax.nn.softmax(jax.lax.stop_gradient(scores)), axis=-1) >= \
              spec.alignment_threshold
        return losses.information_maximization(scores, confident), scores
      (within, entropy, diversity), own_scores = im(label_embeddings[d])
      cross = cross_entropy = None
      if others:
        terms = [im(e)[0] for e in others]
        cross = sum(t[0] for t in terms) / len(terms)
        cross_entropy = sum(t[1] for t in terms) / len(terms)
    else:
      # Dot-product scores are computed at the encoder's resolution and upsampled (exact:
      # the upsampler is linear); cosine scores need the upsampled embedding.
      upsample = None
      if not spec.normalize_pixels:
        upsample = functools.partial(model.upsample_scores, out_size=out_hw)
      kwargs = dict(temperature=spec.temperature, normalize_pixels=spec.normalize_pixels,
                    embeddings_per_class=k, prototype_reduction=spec.prototype_reduction,
                    upsample=upsample)
      within = entropy = losses.within_domain_entropy(embedding, label_embeddings, d, **kwargs)
      cross = cross_entropy = (losses.cross_domain_entropy(embedding, label_embeddings, d,
                                                           **kwargs) if others else None)
      own_scores = losses.label_similarity(jax.lax.stop_gradient(embedding), label_embeddings[d],
                                           temperature=spec.temperature,
                                           normalize_pixels=spec.normalize_pixels)
      own_scores = losses.reduce_prototypes(upsample(own_scores) if upsample else own_scores,
                                            k, spec.prototype_reduction)
      _, _, diversity = losses.information_maximization(own_scores)
    confidence = jnp.max(jax.nn.softmax(jax.lax.stop_gradient(own_scores)), axis=-1)
    metrics[f"within_entropy/{name}"] = entropy
    metrics[f"diversity/{name}"] = diversity
    metrics[f"prototype_confident_fraction/{name}"] = jnp.mean(
        (confidence >= spec.consistency_threshold).astype(jnp.float32))
    if cross_entropy is not None:
      metrics[f"cross_entropy/{name}"] = cross_entropy
    return cross, within

  def consistency_term(params, state, batch_stats, unlabeled, d, metrics, name):
    """Weak-to-strong consistency of domain d; returns (loss, strong outputs, batch_stats)."""
    weak = unlabeled["image"]
    if spec.teacher == "ema":
      teacher, _ = forward(state["teacher"], weak, train=False, head=d)
    else:
      teacher, batch_stats = forward(
          {"params": jax.lax.stop_gradient(params), "batch_stats": batch_stats}, weak,
          train=True, head=d)
    labels, confidence = losses.pseudo_labels(teacher["logits"])
    # CutMix within the domain's batch: example i takes a box of example i + 1.
    partner = jnp.roll(jnp.arange(weak.shape[0]), -1)
    box = unlabeled["cutmix_mask"]
    strong = losses.cutmix(unlabeled["strong"], box, partner)
    labels, confidence, valid = (losses.cutmix(x, box, partner)
                                 for x in (labels, confidence, unlabeled["valid"]))
    out, batch_stats = forward({"params": params, "batch_stats": batch_stats}, strong,
                               train=True, head=d, embedding=spec.uses_label_embeddings,
                               upsample_embedding=spec.normalize_pixels and not infomax)
    loss = losses.consistency_cross_entropy(out["logits"], labels, confidence,
                                            threshold=spec.consistency_threshold, valid=valid)
    valid_f = valid.astype(jnp.float32)
    metrics[f"confident_fraction/{name}"] = jnp.sum(
        (confidence >= spec.consistency_threshold) * valid_f) / jnp.maximum(jnp.sum(valid_f), 1)
    return loss, out, batch_stats

  def labeled_prototype_terms(out, labels, prototypes, metrics, name):
    """Prototype cross entropy and the prototype classifier's agreement on labeled pixels."""
    scores = model.upsample_scores(scores_of(out["embedding"], prototypes), labels.shape[1:3])
    valid = labels != IGNORE_LABEL
    proto_pred = jnp.argmax(scores, axis=-1)
    head_pred = jnp.argmax(out["logits"], axis=-1)
    count = jnp.maximum(jnp.sum(valid), 1)
    metrics[f"prototype_accuracy/{name}"] = jnp.sum((proto_pred == labels) & valid) / count
    metrics[f"prototype_head_agreement/{name}"] = jnp.sum((proto_pred == head_pred) & valid) / count
    return losses.pixel_cross_entropy(scores, labels)

  def loss_fn(params, state, batch):
    batch_stats = state["batch_stats"]
    label_embeddings = state["label_embeddings"]
    metrics, terms = {}, {"sup": [], "cross": [], "within": [], "extra": []}
    prototype_inputs = []
    for d, name in enumerate(domain_names):
      lab = batch[name]["labeled"]
      trained = spec.trained_domains[d]
      variables = {"params": params if trained else _freeze_encoder(params),
                   "batch_stats": batch_stats}
      flags = dict(embedding=True, upsample_embedding=False) if labeled_embedding else {}
      out, batch_stats = forward(variables, lab["image"], train=trained, head=d, **flags)
      sup_d = losses.pixel_cross_entropy(out["logits"], lab["label"])
      terms["sup"].append(sup_d)
      metrics[f"supervised/{name}"] = sup_d
      if labeled_embedding:
        proto_d = labeled_prototype_terms(out, lab["label"], label_embeddings[d], metrics, name)
        if spec.prototype_weight > 0:
          terms["extra"].append(spec.prototype_weight * proto_d)
          metrics[f"prototype/{name}"] = proto_d
        if ema_prototypes:
          embedding = out["embedding"]
          prototype_inputs.append((embedding, _cell_centre_labels(lab["label"],
                                                                  embedding.shape[1:3])))
      if not spec.uses_unlabeled or "unlabeled" not in batch[name]:
        continue
      unlabeled = batch[name]["unlabeled"]
      images = unlabeled["image"]
      if spec.method == "ser":
        out, batch_stats = forward({"params": params, "batch_stats": batch_stats}, images,
                                   train=True, head=d)
        ser_d = losses.decoder_softmax_entropy(out["logits"])
        terms["extra"].append(spec.ser_weight * ser_d)
        metrics[f"ser/{name}"] = ser_d
        continue
      if spec.uses_consistency:
        cons_d, out, batch_stats = consistency_term(params, state, batch_stats, unlabeled, d,
                                                    metrics, name)
        terms["extra"].append(spec.consistency_weight * cons_d)
        metrics[f"consistency/{name}"] = cons_d
      else:
        out, batch_stats = forward(
            {"params": params, "batch_stats": batch_stats}, images, train=True, head=d,
            logits=False, embedding=True,
            upsample_embedding=spec.normalize_pixels and not infomax)
      if spec.uses_label_embeddings and (spec.alpha != 0 or spec.beta != 0):
        cross_d, within_d = label_embedding_terms(out["embedding"], label_embeddings, d,
                                                  images.shape[1:3], metrics, name)
        if spec.alpha != 0 and cross_d is not None:
          terms["cross"].append(cross_d)
          metrics[f"cross/{name}"] = cross_d
        if spec.beta != 0:
          terms["within"].append(within_d)
          metrics[f"within/{name}"] = within_d
    total = losses.total_loss(terms["sup"], terms["cross"], terms["within"], alpha=spec.alpha,
                              beta=spec.beta)
    total = total + sum(terms["extra"], jnp.zeros((), jnp.float32))
    metrics["loss"] = total
    return total, (batch_stats, metrics, prototype_inputs)

  def train_step(state, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (batch_stats, metrics, prototype_inputs)), grads = grad_fn(state["params"], state, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    label_embeddings = state["label_embeddings"]
    if prototype_inputs:
      label_embeddings = tuple(
          ema.ema_update_centroids(e, pixels, jnp.where(labels == IGNORE_LABEL, 0, labels),
                                   labels != IGNORE_LABEL, spec.ema_theta, k)
          for e, (pixels, labels) in zip(label_embeddings, prototype_inputs))
    metrics["grad_norm"] = optax.global_norm(grads)
    new_state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state,
                 "step": state["step"] + 1, "label_embeddings": label_embeddings}
    if spec.uses_teacher_state:
      new_state["teacher"] = ema_teacher(state["teacher"], params, batch_stats, state["step"],
                                         spec.teacher_decay)
    return new_state, metrics

  return train_step


def ema_teacher(teacher: dict, params: PyTree, batch_stats: PyTree, step: jax.Array,
                decay: float) -> dict:
  """Mean-teacher update: teacher <- d * teacher + (1 - d) * student, d = min(decay, (t+1)/(t+10)).

  The ramp lets the teacher follow the quickly changing early student. Integer leaves (BN's
  batch counter) are copied from the student.
  """
  d = jnp.minimum(decay, (step + 1.0) / (step + 10.0))

  def mix(t, s):
    if not jnp.issubdtype(s.dtype, jnp.floating):
      return s
    return (d * t + (1.0 - d) * s).astype(t.dtype)
  return {"params": jax.tree.map(mix, teacher["params"], params),
          "batch_stats": jax.tree.map(mix, teacher["batch_stats"], batch_stats)}


def jit_train_step(train_step, mesh: Mesh | None):
  """jit with a replicated state (donated) and a batch sharded over the mesh's data axis."""
  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  replicated = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharding.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
