"""What an experiment config means: the methods, the resolved loss spec, validation.

A config is an `ml_collections.ConfigDict` from a `configs/*.py` file (`get_config()`).
`validate_config` checks every value the code would otherwise trip over later, naming the key;
`loss_spec_from_config` resolves the method and its weights into the static `LossSpec` that the
train step is built from. The choices of each key live next to the code that uses them.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from usss_jax import label_embeddings, losses, metrics
from usss_jax.data import strong_augment, transforms
from usss_jax.models import layers, universal

# single: one domain's labels train the encoder, the other heads learn on it frozen.
# basic: joint supervised training. cross / full: + the label-embedding terms on unlabeled
# images (alpha: cross-domain; alpha and beta: cross- and within-domain; see `alignment`).
# ser: + the softmax entropy of each head's output on unlabeled images.
# consistency: basic + weak-to-strong consistency per domain (FixMatch / UniMatch).
# universal: consistency + the terms of full.
METHODS = ("single", "basic", "cross", "full", "ser", "consistency", "universal")
LABEL_EMBEDDING_METHODS = ("cross", "full", "universal")
# How the label-embedding terms score pixels: "reference" = the paper's code (dot product of
# the unnormalised pixel embedding with unit prototypes, entropy minimisation; collapses by
# growing the embedding), "infomax" = cosine / temperature and E[H(p)] - H(E[p]).
ALIGNMENTS = ("reference", "infomax")
TEACHERS = ("student", "ema")  # who labels the weak view: the model itself, or its EMA
BATCH_KEYS = ("labeled_batch", "unlabeled_batch", "eval_batch")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


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
  alignment: str = "reference"
  alignment_threshold: float = 0.0   # infomax: pixels below this confidence leave E[H(p)]
  prototype_weight: float = 0.0      # supervised prototype cross entropy on labeled pixels
  consistency_weight: float = 0.0    # > 0: weak-to-strong consistency
  consistency_threshold: float = 0.95
  teacher: str = "student"
  teacher_decay: float = 0.99

  @property
  def uses_label_embeddings(self) -> bool:
    return self.method in LABEL_EMBEDDING_METHODS

  @property
  def uses_consistency(self) -> bool:
    return self.consistency_weight > 0

  @property
  def uses_unlabeled(self) -> bool:
    return (self.method == "ser" or self.uses_consistency or
            (self.uses_label_embeddings and (self.alpha != 0 or self.beta != 0)))

  @property
  def uses_teacher_state(self) -> bool:
    return self.uses_consistency and self.teacher == "ema"


def _check_choice(config: ml_collections.ConfigDict, key: str, choices) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r}: expected one of {tuple(choices)}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key for values that cannot work."""
  _check_choice(config, "method", METHODS)
  if not config.domain_names:
    raise ConfigError("config.domain_names is empty: name at least one domain")
  for name in config.domain_names:
    if name not in config.domains:
      raise ConfigError(f"config.domain_names names {name!r}, which is not in config.domains "
                        f"(known: {sorted(config.domains.keys())})")
    crop = tuple(config.domains[name].crop)
    if len(crop) != 2 or min(crop) <= 0:
      raise ConfigError(f"config.domains.{name}.crop={crop}: expected (height, width)")
    dc = config.domains[name]
    if dc.eval_split == "holdout" and dc.get("holdout", 0) <= 0:
      raise ConfigError(f"config.domains.{name}.eval_split='holdout' needs "
                        f"config.domains.{name}.holdout > 0 (training images held out)")
  if config.method == "single" and config.single_domain and \
      config.single_domain not in config.domain_names:
    raise ConfigError(f"config.single_domain={config.single_domain!r} is not in "
                      f"config.domain_names={tuple(config.domain_names)}")
  _check_choice(config, "dtype", universal.COMPUTE_DTYPES)
  _check_choice(config, "upsample", layers.UPSAMPLE_MODES)
  _check_choice(config, "conv_weight_grad", layers.WEIGHT_GRADS)
  _check_choice(config, "miou_convention", metrics.MIOU_CONVENTIONS)
  _check_choice(config, "prototype_reduction", losses.PROTOTYPE_REDUCTIONS)
  _check_choice(config, "normalization", transforms.NORMALIZATIONS)
  _check_choice(config, "label_embeddings.source", label_embeddings.SOURCES)
  _check_choice(config, "alignment", ALIGNMENTS)
  _check_choice(config, "consistency.teacher", TEACHERS)
  for key in ("consistency.threshold", "alignment_threshold"):
    value = config.consistency.threshold if key.startswith("consistency") else config[key]
    if not 0.0 <= value <= 1.0:
      raise ConfigError(f"config.{key}={value} must be a confidence in [0, 1]")
  if not 0.0 <= config.consistency.ema_decay < 1.0:
    raise ConfigError(f"config.consistency.ema_decay={config.consistency.ema_decay} must be "
                      "in [0, 1)")
  try:
    strong_augment.StrongAugmentConfig.from_dict(config.strong_augment)
  except ValueError as e:
    raise ConfigError(f"config.strong_augment: {e}") from None
  if config.embedding_dim <= 0 and config.method in LABEL_EMBEDDING_METHODS:
    raise ConfigError(f"config.embedding_dim={config.embedding_dim}: method "
                      f"{config.method!r} needs the entropy module")
  n_dev = jax.device_count()
  for key in BATCH_KEYS:
    value = config[key]
    if value < 0:
      raise ConfigError(f"config.{key}={value} must be >= 0")
    if not config.batch_per_device and value % n_dev:
      lower, upper = value // n_dev * n_dev, -(-value // n_dev) * n_dev
      choices = " or ".join(str(v) for v in (lower, upper) if v > 0)
      raise ConfigError(
          f"config.{key}={value} is not a multiple of the {n_dev} devices the batch is split "
          f"over: use {choices}, or --config.batch_per_device=True to mean {value} per device "
          f"({value * n_dev} in all)")
  if config.labeled_batch == 0:
    raise ConfigError("config.labeled_batch must be positive")
  for key in ("total_steps", "eval_every", "checkpoint_every", "log_every"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be positive")


def global_batch(config: ml_collections.ConfigDict, key: str) -> int:
  """The global batch size of `config.<key>` (per domain), honouring `batch_per_device`."""
  return int(config[key]) * (jax.device_count() if config.batch_per_device else 1)


def loss_spec_from_config(config: ml_collections.ConfigDict) -> LossSpec:
  names = tuple(config.domain_names)
  method = config.method
  alpha, beta = float(config.alpha), float(config.beta)
  if method in ("single", "basic", "ser", "consistency"):
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
      ema_theta=float(config.label_embeddings.ema_theta),
      alignment=config.alignment, alignment_threshold=float(config.alignment_threshold),
      prototype_weight=(float(config.prototype_loss_weight)
                        if method in LABEL_EMBEDDING_METHODS else 0.0),
      consistency_weight=(float(config.consistency.weight)
                          if method in ("consistency", "universal") else 0.0),
      consistency_threshold=float(config.consistency.threshold),
      teacher=config.consistency.teacher, teacher_decay=float(config.consistency.ema_decay))
