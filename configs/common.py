"""Defaults shared by every experiment config (the paper's recipe)."""

import dataclasses
import os

import ml_collections

from usss_jax.data import strong_augment

_HERE = os.path.dirname(os.path.abspath(__file__))
# Real dataset roots: USSS_DATA_ROOT, else ../shared/data beside the project (internal samples).
DATA_ROOT = os.environ.get("USSS_DATA_ROOT",
                           os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "data")))


def domain(dataset: str, root: str, *, crop, train_split="train", eval_split="val",
           resize=(), eval_resize=(), scale_range=(1.0, 1.0), flip=True, generate_demo=False,
           holdout=0, **options) -> ml_collections.ConfigDict:
  """One domain: which reader, where its data lives and how its crops are made.

  Args:
    dataset: reader name (usss_jax.data.READERS).
    root: dataset root in its official layout.
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


# Variants a paper config takes after its name ("configs/cs_sun.py:consistency").
PAPER_VARIANTS = {
    # The recommended method of docs/RESULTS.md (chosen on validation data): weak-to-strong
    # consistency per domain, threshold 0.95, the student as its own teacher.
    "consistency": dict(method="consistency"),
}


def paper_variant(c: ml_collections.ConfigDict, arg: str | None,
                  config_file: str) -> ml_collections.ConfigDict:
  """Applies the named variant of PAPER_VARIANTS to a paper config (None: the paper's method)."""
  if arg is None:
    return c
  if arg not in PAPER_VARIANTS:
    raise ValueError(f"{config_file}: unknown variant {arg!r}; choose from "
                     f"{sorted(PAPER_VARIANTS)} or none")
  c.update(PAPER_VARIANTS[arg])
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # single | basic | cross | full | ser | consistency | universal (usss_jax/config.py: METHODS).
  c.method = "full"
  c.alpha = 1.0        # weight of the cross-domain entropy
  c.beta = 1.0         # weight of the within-domain entropy
  c.ser_weight = 1.0   # weight of the decoder softmax entropy (method "ser")
  c.single_domain = ""  # method "single": the domain whose labels train the encoder ("" = first)
  c.seed = 0
  c.num_labeled = 100  # labeled images per domain (<= 0: all)
  c.unlabeled_includes_labeled = False  # the reference put the labeled images in the pool too

  c.domain_names = ()  # order of the heads; a subset of `domains`
  c.domains = ml_collections.ConfigDict()

  # Model.
  c.encoder = "drn_d_22"
  c.encoder_channels = ()  # () = the named encoder's widths; 8 ints for custom/tiny models
  c.pretrained = ""        # ImageNet DRN weights (.npz, or .pth with torch installed)
  c.embedding_dim = 128
  c.embeddings_per_class = 1  # K prototypes per class (K-means when > 1)
  c.upsample = "transposed"   # "transposed" (reference, attenuated border) | "resize"
  c.dtype = "float32"         # compute dtype: float32 | bfloat16 (params stay float32)
  c.conv_weight_grad = "auto"  # auto | xla | taps: how convs compute kernel gradients (speed only)

  # Entropy module options (defaults = reference).
  c.alignment = "reference"   # reference (the paper's code) | infomax (cosine, E[H] - H(E[p]))
  c.temperature = 1.0         # scores are divided by it (infomax: cosine / temperature)
  c.normalize_pixels = False  # reference alignment only: cosine instead of the dot product
  c.alignment_threshold = 0.0  # infomax: pixels less confident than this leave E[H(p)]
  c.prototype_loss_weight = 0.0  # cross entropy of labeled pixels' prototype scores
  c.prototype_reduction = "none"  # none | max | logsumexp (for K > 1)

  # Weak-to-strong consistency (methods consistency, universal): pseudo-labels of the weak
  # view (the training crop) supervise the strong view (same crop, photometric noise, CutMix
  # within the domain's batch) where their confidence reaches the threshold.
  c.consistency = ml_collections.ConfigDict(dict(
      weight=1.0,
      threshold=0.95,
      teacher="student",  # student (the model, train-mode BN) | ema (EMA weights, eval BN)
      ema_decay=0.99,
  ))
  c.strong_augment = ml_collections.ConfigDict(
      dataclasses.asdict(strong_augment.StrongAugmentConfig()))  # data/strong_augment.py

  # Label embeddings (paper supplementary B.1).
  c.label_embeddings = ml_collections.ConfigDict(dict(
      source="pretrain",     # pretrain | file | random
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
