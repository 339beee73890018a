"""What an experiment config is: the defaults every config starts from, and checks of its values.

An experiment is a file `configs/<name>.py` whose `get_config()` returns an
`ml_collections.ConfigDict` built on `base_config()` (the paper's recipe) with one `domain()`
entry per dataset. `validate_config` checks the values this module owns (domains, batch sizes,
lengths, the optimiser); each later stage checks the keys it reads when it is set up
(`objectives.method_spec`: the method and its terms; `state.make_model`: the model), and
`usss_jax.modes.check_config` runs them all before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os

import jax
import ml_collections

from usss_jax import files, metrics
from usss_jax.data import strong_augment, transforms

# config.<key> values that are global batch sizes per domain (split over the devices).
BATCH_KEYS = ("labeled_batch", "unlabeled_batch", "eval_batch")
DATA_ROOT_ENV = "USSS_DATA_ROOT"
# A checkout (the package beside pyproject.toml, e.g. an editable install) keeps internal data
# samples beside the project (../shared/data); an installed package has no such default.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = os.path.dirname(_PACKAGE)
_CHECKOUT_DATA = os.path.normpath(os.path.join(_CHECKOUT, "..", "shared", "data"))
# What a user sets when no data root is known (the message of the error a run stops with).
DATA_ROOT_HINT = (f"set ${DATA_ROOT_ENV} to the folder holding the datasets, pass --data_root=DIR, "
                  "or set --config.domains.NAME.root=DIR")


class ConfigError(ValueError):
  """A config or flag value that cannot work; the message names the key and what to do."""


def data_root() -> str:
  """Folder holding the datasets: $USSS_DATA_ROOT (the launchers' --data_root sets it), else a
  checkout's ../shared/data, else "" (unknown: a run that needs a dataset stops with an error
  saying what to set, `check_dataset_roots`)."""
  if os.environ.get(DATA_ROOT_ENV):
    return os.path.expanduser(os.environ[DATA_ROOT_ENV])
  in_checkout = os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml"))
  return _CHECKOUT_DATA if in_checkout and os.path.isdir(_CHECKOUT_DATA) else ""


def dataset_root(name: str) -> str:
  """`<data_root()>/<name>`, or "" when no data root is known.

  "" keeps a config loadable without data (`--mode=config`, overriding the root on the command
  line); every command that reads the dataset stops on it first (`check_dataset_roots`).
  """
  root = data_root()
  return os.path.join(root, name) if root else ""


def check_dataset_roots(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first domain whose dataset root is unset, and what to set."""
  for name in config.domain_names:
    if name in config.domains and not config.domains[name].root:
      raise ConfigError(f"config.domains.{name}.root is empty: no data root is known\n"
                        f"hint: {DATA_ROOT_HINT.replace('NAME', name)}")


def config_dirs() -> list[str]:
  """Where experiment configs are found by name: a checkout's configs/, then the installed
  ones (pyproject.toml installs configs/ as the package data `usss_jax/configs/`)."""
  return [os.path.join(os.path.dirname(_PACKAGE), "configs"), os.path.join(_PACKAGE, "configs")]


def find_config_file(name: str) -> str | None:
  """The file of config `name` ("demo", "demo.py" or "configs/demo.py") in `config_dirs()`."""
  base = os.path.basename(name)
  base = base if base.endswith(".py") else base + ".py"
  return next((path for path in (os.path.join(d, base) for d in config_dirs())
               if os.path.isfile(path)), None)


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file path or an installed config's name (e.g. "demo")."""
  path = name if os.path.isfile(name) else find_config_file(name)
  if path is None:
    known = sorted({f[:-3] for d in config_dirs() if os.path.isdir(d) for f in os.listdir(d)
                    if f.endswith(".py") and not f.startswith("_")})
    raise ConfigError(f"{name}: no such config file or installed config (known: {known})")
  spec = importlib.util.spec_from_file_location(f"usss_config_{os.path.basename(path)[:-3]}",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def domain(dataset: str, root: str, *, crop, train_split="train", eval_split="val",
           resize=(), eval_resize=(), scale_range=(1.0, 1.0), flip=True, generate_demo=False,
           holdout=0, **options) -> ml_collections.ConfigDict:
  """One domain: which reader, where its data lives and how its crops are made.

  Args:
    dataset: reader name (usss_jax.data.READERS).
    root: dataset root in its official layout ("" = unset: the run stops with a hint).
    crop: (h, w) training crop.
    resize: (h, w) every training image is resized to first; () = keep.
    eval_resize: (h, w) the network sees at evaluation; logits are resized back, so
      the metric is always at label resolution; () = full resolution.
    generate_demo: write the embedded demo data to `root`'s parent on first use.
    holdout: training images set aside (fixed seed, the same for every run) as validation
      data; they leave the labeled/unlabeled pools, and eval_split="holdout" evaluates on them.
    **options: passed to the reader (e.g. CamVid's `list_suffix`).
  """
  return ml_collections.ConfigDict(dict(
      dataset=dataset, root=root, train_split=train_split, eval_split=eval_split,
      crop=tuple(crop), resize=tuple(resize), eval_resize=tuple(eval_resize),
      scale_range=tuple(scale_range), flip=flip, generate_demo=generate_demo,
      holdout=holdout, options=ml_collections.ConfigDict(options)))


def recommended_recipe(c: ml_collections.ConfigDict, length: int) -> ml_collections.ConfigDict:
  """Sets `c` to the recommended semi-supervised recipe (docs/RESULTS.md; chosen on validation
  data), `length` supervised + semi-supervised steps in all.

  The shared encoder is first pretrained on the unlabeled images (dense contrastive, length / 3
  steps), then trained on the labeled images alone (the warm start, length / 2), then with
  weak-to-strong consistency for the other half: an EMA teacher with BN on the weak batch whose
  decay ramps from 0.99 to 0.999 over that half, pseudo-labels aligned to the labeled class
  frequencies, FreeMatch's self-adaptive class-wise thresholds. The proportions are those
  validated on configs/camvid_iddlite.py (length 3000).
  """
  half = length // 2
  c.method = "consistency"
  c.self_supervised.steps = length // 3
  c.warm_start.steps = half
  c.total_steps = length - half
  c.consistency.update(dict(
      teacher="ema_train_bn", ema_decay_start=0.99, ema_decay=0.999, ema_decay_rampup=length - half,
      distribution_alignment=True, threshold_rule="freematch", class_stats_momentum=0.99))
  return c


# Variants a paper config takes after its name ("configs/cs_sun.py:recommended"): each changes
# the method only, over the paper config's own number of steps.
PAPER_VARIANTS = {
    "recommended": lambda c: recommended_recipe(c, int(c.total_steps)),
    "consistency": lambda c: _plain_consistency(c),
}


def _plain_consistency(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Weak-to-strong consistency from scratch (FixMatch-style: threshold 0.95, the student as its
  own teacher): the first round's choice."""
  c.method = "consistency"
  return c


def paper_variant(c: ml_collections.ConfigDict, arg: str | None,
                  config_file: str) -> ml_collections.ConfigDict:
  """Applies the named variant of PAPER_VARIANTS to a paper config (None: the paper's method)."""
  if arg is None:
    return c
  if arg not in PAPER_VARIANTS:
    raise ValueError(f"{config_file}: unknown variant {arg!r}; choose from "
                     f"{sorted(PAPER_VARIANTS)} or none")
  return PAPER_VARIANTS[arg](c)


def base_config() -> ml_collections.ConfigDict:
  """The defaults of every experiment: the paper's recipe (SGD 1e-3, batch 10, d=128, ...)."""
  c = ml_collections.ConfigDict()
  # single | basic | cross | full | ser | consistency | universal (objectives.METHODS).
  c.method = "full"
  c.alpha = 1.0        # weight of the cross-domain entropy
  c.beta = 1.0         # weight of the within-domain entropy
  c.ser_weight = 1.0   # weight of the decoder softmax entropy (method "ser")
  c.single_domain = ""  # method "single": the domain whose labels train the encoder ("" = first)
  c.seed = 0
  c.split_seed = -1    # seed of the labeled/unlabeled split (-1: config.seed)
  c.num_labeled = 100  # labeled images per domain (<= 0: all)
  # A num_labeled above a domain's pool of training images: "error" (the run stops naming the
  # pool size) | "warn" (all its images are labeled, with a warning).
  c.num_labeled_above_pool = "error"
  c.unlabeled_includes_labeled = False  # the reference put the labeled images in the pool too

  c.domain_names = ()  # order of the heads; a subset of `domains`
  c.domains = ml_collections.ConfigDict()

  # Model.
  c.encoder = "drn_d_22"
  c.encoder_channels = ()  # () = the named encoder's widths; 8 ints for custom/tiny models
  c.pretrained = ""        # ImageNet DRN weights (.npz, or .pth with torch installed)
  # A run directory: the model starts from its latest checkpoint (parameters and BN statistics
  # of a run with the same domains and model, e.g. a finished "basic" run).
  c.init_from = ""
  # steps > 0: first a supervised (basic) run of that many steps in <workdir>/warm_start, which
  # the run then starts from (usss_jax/warm_start_stage.py).
  c.warm_start = ml_collections.ConfigDict(dict(steps=0))
  # steps > 0: first a dense contrastive pretraining of the encoder on every domain's unlabeled
  # training images in <workdir>/self_supervised, which the run then starts from
  # (usss_jax/self_supervised_stage.py; the options: usss_jax/self_supervised/pretrain.py).
  c.self_supervised = ml_collections.ConfigDict(dict(
      steps=0, batch_per_domain=8, learning_rate=0.05, warmup_steps=100, optimizer="sgd",
      momentum=0.9, weight_decay=1e-4, temperature=0.2, exclude_radius=0,
      projection_hidden=128, projection_dim=64, max_shift_cells=(3, 4),
      scale_range=(),  # () = each domain's training scale_range
      log_every=50))
  c.embedding_dim = 128
  c.embeddings_per_class = 1  # K prototypes per class (K-means when > 1)
  c.upsample = "transposed"   # "transposed" (reference, attenuated border) | "resize"
  c.dtype = "float32"         # compute dtype: float32 | bfloat16 (params stay float32)
  c.conv_weight_grad = "auto"  # auto | xla | taps: how convs compute kernel gradients (speed only)

  # Entropy module options (defaults = reference).
  # reference (the paper's code) | infomax (cosine, E[H] - H(E[p])) | infomax_prior (cosine,
  # E[H] + KL(E[p] || labeled class frequencies): the batch follows the labeled class mix).
  c.alignment = "reference"
  c.temperature = 1.0         # scores are divided by it (infomax: cosine / temperature)
  c.normalize_pixels = False  # reference alignment only: cosine instead of the dot product
  c.alignment_threshold = 0.0  # infomax: pixels less confident than this leave E[H(p)]
  c.alignment_view = ""  # "" (the method's) | unlabeled | weak | strong: what the terms score
  c.prototype_loss_weight = 0.0  # cross entropy of labeled pixels' prototype scores
  c.prototype_reduction = "none"  # none | max | logsumexp (for K > 1)

  # Every unlabeled term: a supervised-only warm-up (the unlabeled forwards are skipped), then
  # a sigmoid ramp of its weight, weight x exp(-5 (1 - t / rampup_steps)^2) (Laine & Aila).
  c.unlabeled = ml_collections.ConfigDict(dict(warmup_steps=0, rampup_steps=0))

  # Weak-to-strong consistency (methods consistency, universal): pseudo-labels of the weak
  # view (the training crop) supervise the strong view (same crop, photometric noise, CutMix
  # within the domain's batch) where their confidence reaches the threshold.
  c.consistency = ml_collections.ConfigDict(dict(
      weight=1.0,
      threshold=0.95,
      # fixed: `threshold` for every class | freematch: self-adaptive, the running mean
      # confidence scaled per class by the running class probabilities (FreeMatch).
      threshold_rule="fixed",
      # Teacher probabilities x (labeled class frequencies / their running mean), renormalised
      # (distribution alignment, ReMixMatch): pseudo-labels follow the labeled class mix.
      distribution_alignment=False,
      class_stats_momentum=0.999,  # running means of the teacher's confidence and classes
      # student: the model, train-mode BN | ema: EMA weights, eval-mode BN | ema_train_bn: EMA
      # weights, BN on the weak batch | frozen: the initial model (init_from / pretrained) |
      # peer: Cross Pseudo Supervision, a second network trained beside the model, each
      # labelling the other's weak view (it starts from the same loaded encoder, heads its own).
      teacher="student",
      ema_decay=0.99,
      ema_decay_start=-1.0,  # >= 0: the decay ramps linearly from it to ema_decay ...
      ema_decay_rampup=0,    # ... over these steps
  ))
  # > 0: every other domain's head learns on a domain's unlabeled images the same way (its
  # weak-view pseudo-labels train it on the strong view): objectives/cross_consistency.py.
  c.cross_consistency = ml_collections.ConfigDict(dict(weight=0.0))
  c.strong_augment = ml_collections.ConfigDict(
      dataclasses.asdict(strong_augment.StrongAugmentConfig()))  # data/strong_augment.py

  # Label embeddings (paper supplementary B.1).
  c.label_embeddings = ml_collections.ConfigDict(dict(
      # pretrain: per domain, a model trained on its labeled images alone (the paper) | joint:
      # the model the run starts from (init_from / the warm start), one PCA basis over every
      # domain's labeled pixels | file | random (the released reference code)
      source="pretrain",
      project_embedding=False,  # joint: the entropy module starts as that PCA projection
      # .npz/.npy per domain: "name=path,name=path", or one .npz with a key per domain
      file="",
      pretrain_steps=500,    # steps of the per-domain supervised model
      pretrain_checkpoint="",  # reuse a trained model instead (workdir of a 'single' run)
      max_pixels_per_image=4096,
      ema_theta=0.0,         # > 0: EMA update of the centroids from labeled pixels
  ))

  # Optimisation (paper: SGD 1e-3, momentum 0.9, wd 1e-4, poly 0.9, batch 10).
  c.learning_rate = 1e-3
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.poly_power = 0.9
  c.labeled_batch = 10    # per domain, global (split over the devices)
  c.unlabeled_batch = 10  # per domain, global; the unlabeled:labeled ratio
  c.batch_per_device = False  # True: the three batch sizes are per device (x device count)
  c.total_steps = 20000
  c.normalization = "imagenet"  # imagenet | none (the reference fed raw [0, 1] pixels)
  c.workers = 0           # grain worker processes per stream
  c.data_cache_mb = 512   # decoded training images kept in memory, per stream (speed only)
  # A training image that fails to load (truncated, unreadable) is an error naming the file,
  # domain, stream and step; True replaces it by the next loadable image of its stream and
  # counts it (metrics.jsonl: bad_images_skipped).
  c.skip_bad_images = False
  # A label value outside a domain's classes (not the ignore value 255): "error" names the file
  # and the values; "ignore" counts such pixels as void, with one warning per file.
  c.invalid_labels = "error"

  # Bookkeeping.
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.collapse_threshold = 1e-3  # warn when an unsupervised entropy / diversity falls below it
  c.eval_batch = 2
  c.eval_max_examples = -1     # -1: the whole split
  c.miou_convention = "standard"  # standard (absent classes excluded) | reference (count as 0)
  return c


def run_config(workdir: str, fallback: ml_collections.ConfigDict | None = None
               ) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`), else `fallback`.

  Keys added to the defaults after the run was trained take their default values.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    if fallback is None:
      raise FileNotFoundError(f"{path}: no such file; is {workdir} a run directory?")
    return fallback

  def merge(defaults: dict, saved: dict) -> dict:
    out = dict(defaults)
    for key, value in saved.items():
      out[key] = (merge(defaults[key], value)
                  if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value)
    return out
  defaults = json.loads(base_config().to_json())
  return ml_collections.ConfigDict(merge(defaults, files.read_json(path, "run's config")))


def _get(config: ml_collections.ConfigDict, key: str):
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def check_choice(config: ml_collections.ConfigDict, key: str, choices) -> None:
  """ConfigError unless `config.<key>` (dotted) is one of `choices`."""
  value = _get(config, key)
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r}: expected one of {tuple(choices)}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key for values of the domains, batches, lengths and optimiser
  that cannot work."""
  if not config.domain_names:
    raise ConfigError("config.domain_names is empty: name at least one domain")
  for name in config.domain_names:
    if name not in config.domains:
      raise ConfigError(f"config.domain_names names {name!r}, which is not in config.domains "
                        f"(known: {sorted(config.domains.keys())})")
    dc = config.domains[name]
    crop = tuple(dc.crop)
    if len(crop) != 2 or min(crop) <= 0:
      raise ConfigError(f"config.domains.{name}.crop={crop}: expected (height, width)")
    if dc.eval_split == "holdout" and dc.get("holdout", 0) <= 0:
      raise ConfigError(f"config.domains.{name}.eval_split='holdout' needs "
                        f"config.domains.{name}.holdout > 0 (training images held out)")
  if config.method == "single" and config.single_domain and \
      config.single_domain not in config.domain_names:
    raise ConfigError(f"config.single_domain={config.single_domain!r} is not in "
                      f"config.domain_names={tuple(config.domain_names)}")
  check_choice(config, "normalization", transforms.NORMALIZATIONS)
  check_choice(config, "miou_convention", metrics.MIOU_CONVENTIONS)
  check_choice(config, "invalid_labels", ("error", "ignore"))
  try:
    strong_augment.StrongAugmentConfig.from_dict(config.strong_augment)
  except ValueError as e:
    raise ConfigError(f"config.strong_augment: {e}") from None
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
  check_choice(config, "num_labeled_above_pool", ("error", "warn"))
  for key, (low, high, meaning) in VALUE_RANGES.items():
    check_range(config, key, low, high, meaning)


# Keys of base_config() whose values have a range: (lowest, highest, what the range says);
# a bound is inclusive unless its tuple says "open". A negative or zero value where none makes
# sense is an error before anything runs (a negative learning rate trains uphill).
_POSITIVE = ((0, "open"), None, "must be positive")
_NON_NEGATIVE = ((0, "closed"), None, "must be >= 0")
_FRACTION = ((0, "closed"), (1, "open"), "must be in [0, 1)")
VALUE_RANGES = {
    "learning_rate": _POSITIVE,
    "momentum": _FRACTION,
    "weight_decay": _NON_NEGATIVE,
    "poly_power": _NON_NEGATIVE,
    "total_steps": _POSITIVE,
    "eval_every": _POSITIVE,
    "checkpoint_every": _POSITIVE,
    "log_every": _POSITIVE,
    "keep_checkpoints": ((1, "closed"), None, "must be >= 1"),
    "eval_batch": _POSITIVE,
    "alpha": _NON_NEGATIVE,
    "beta": _NON_NEGATIVE,
    "ser_weight": _NON_NEGATIVE,
    "prototype_loss_weight": _NON_NEGATIVE,
    "temperature": _POSITIVE,
    "embedding_dim": _NON_NEGATIVE,
    "embeddings_per_class": ((1, "closed"), None, "must be >= 1"),
    "collapse_threshold": _NON_NEGATIVE,
    "workers": _NON_NEGATIVE,
    "data_cache_mb": _NON_NEGATIVE,
    "consistency.weight": _NON_NEGATIVE,
    "label_embeddings.pretrain_steps": _NON_NEGATIVE,
    "label_embeddings.max_pixels_per_image": _POSITIVE,
    "label_embeddings.ema_theta": ((0, "closed"), (1, "closed"), "must be in [0, 1]"),
    "warm_start.steps": _NON_NEGATIVE,
}


def check_range(config: ml_collections.ConfigDict, key: str, low, high, meaning: str) -> None:
  """ConfigError unless `config.<key>` (dotted; absent keys pass) is a finite number in range."""
  try:
    value = _get(config, key)
  except (KeyError, AttributeError):
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(f"config.{key}={value!r}: expected a finite number ({meaning})")
  below = low is not None and (value < low[0] or (low[1] == "open" and value == low[0]))
  above = high is not None and (value > high[0] or (high[1] == "open" and value == high[0]))
  if below or above:
    raise ConfigError(f"config.{key}={value!r} {meaning}")


def split_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the labeled/unlabeled split: config.split_seed, or config.seed when -1."""
  return int(config.seed if config.get("split_seed", -1) < 0 else config.split_seed)


def global_batch(config: ml_collections.ConfigDict, key: str) -> int:
  """The global batch size of `config.<key>` (per domain), honouring `batch_per_device`."""
  return int(config[key]) * (jax.device_count() if config.batch_per_device else 1)
