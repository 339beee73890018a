"""The universal train step in PyTorch, for timing against the JAX step (benchmarks/train_step.py).

  TORCH_PY benchmarks/torch_step.py [--method full] [--height 256 --width 512] [--json]
  TORCH_PY benchmarks/torch_step.py --inputs step.npz --json-out torch.json
  TORCH_PY benchmarks/torch_step.py --device cuda [--bf16]   # on a GPU (benchmarks/gpu_check.py)

TORCH_PY is any Python with torch and numpy (torch is not a dependency of this
project and this script imports nothing from it or from jax), e.g. a separate
venv: `python3 -m venv /opt/torchvenv && /opt/torchvenv/bin/pip install torch
numpy`.

The step is the PyTorch equivalent of `usss_jax.train.make_train_step` for the
methods "basic", "cross" and "full", with the same shapes as
benchmarks/train_step.py: a DRN-D encoder (NCHW, bias-free convolutions,
BatchNorm2d eps 1e-5 momentum 0.1, He fan-out init; module names are the
PyTorch state-dict names of `usss_jax.convert.drn_variables_to_torch`), per
domain d a 1x1 head (512 -> C_d, bias), a 1x1 embedding conv (512 -> D, bias)
and the reference's frozen bilinear depthwise ConvTranspose2d (kernel 16,
stride 8, padding 4) cropped to the input size. One step, for each domain in
order: the labeled images through a train-mode forward to head d's logits ->
cross entropy (label 255 ignored, mean over valid pixels, 0 if none); then
(unless "basic") the unlabeled images through a separate train-mode forward to
the pixel embedding -> entropy of softmax(<e, normalised label embeddings>)
over the domain's own labels (within, weight beta) and over the other domains'
labels (cross, weight alpha; averaged over the other domains when there are
more than two). One backward of sum_d CE_d + alpha sum_d cross_d + beta sum_d
within_d, then torch.optim.SGD(lr, momentum 0.9, weight_decay 1e-4) over all
trainable parameters (every parameter is updated every step, also those with a
zero gradient, as optax does). By default the D-channel embedding is upsampled
before the scores are taken (the reference's order); --low-res-scores takes the
scores at the encoder's resolution and upsamples their M channels instead, as
usss_jax's step does (the same scores up to rounding: the upsampler is linear).

--inputs PATH.npz takes the initial weights and the batch from the JAX side
instead of a random init, with these keys (<d> = domain index 0, 1, ...):
  encoder/<torch name>        the encoder state dict (drn_variables_to_torch),
                              e.g. encoder/layer0.0.weight [c0, 3, 7, 7]
  head_<d>/weight, /bias      [C_d, 512, 1, 1], [C_d]
  embedding/weight, /bias     [D, 512, 1, 1], [D]   (not needed for "basic")
  label_embeddings/<d>        [M_d, D]              (not needed for "basic")
  batch/<d>/labeled/image     [B, H, W, 3] float32 NHWC
  batch/<d>/labeled/label     [B, H, W] int
  batch/<d>/unlabeled/image   [B_u, H, W, 3]        (not needed for "basic")
  domain_names                optional [K] str: names used in "check"
Classes, embedding size, batch sizes and image size are then read from the
file (the flags for them are ignored); --encoder and --encoder-channels must
describe the file's encoder. Before timing, the first step's loss terms (with
the file's weights) are reported under "check", named like the metrics of
usss_jax's train step: "loss", "supervised/<name>", "cross/<name>",
"within/<name>", "grad_norm" (names default to domain0, domain1, ... as in
benchmarks/train_step.py); "check_second_step_loss" is the loss of the next
step, after one SGD update. That first step counts as the first warm-up step.

Without --inputs the weights are random (torch.manual_seed(--seed)); images,
labels and label embeddings are drawn with NumPy exactly as
benchmarks/train_step.py and embedding_stage.random_embeddings draw them.

--device cuda runs the model and the batch on the GPU (cuDNN picks its convolution algorithms
by benchmarking them, as XLA autotunes its own; the device's peak memory is reported).

Timing: --warmup untimed steps, then the median of --steps timed steps;
"busy_cores" = process CPU time / wall time over the timed steps. Busy cores
well below --threads mean that another process took CPU time: torch's worker
threads then wait on each other at every operator, and a step can take several
times longer than the lost share suggests (on a 2-core VM with one other busy
process, 2 threads ran a small step 7x to 80x slower than 1 thread). Compare numbers
from an idle machine only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # pragma: no cover - depends on the interpreter
  sys.exit("benchmarks/torch_step.py needs PyTorch, which is not a dependency of this project: "
           "run it with a Python that has torch and numpy installed (see the docstring).")

IGNORE_LABEL = 255
UPSAMPLE_FACTOR = 8
METHODS = ("basic", "cross", "full")
DEFAULT_CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)
# Layer lists of the DRN-D variants (fyu/drn drn_d_22/38/54/105), as usss_jax.models.drn.
ENCODERS = {
    "drn_d_22": ("basic", (1, 1, 2, 2, 2, 2, 1, 1)),
    "drn_d_38": ("basic", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_54": ("bottleneck", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_105": ("bottleneck", (1, 1, 3, 4, 23, 3, 1, 1)),
}


# ---------------------------------------------------------------------------- model

def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
  """Bias-free conv with symmetric padding dilation * (kernel - 1) / 2."""
  return nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel - 1) // 2,
                   dilation=dilation, bias=False)


def _conv_stack(cin: int, cout: int, num_convs: int, kernel: int = 3, stride: int = 1,
                dilation: int = 1) -> nn.Sequential:
  """num_convs x (conv -> BN -> ReLU); stride on the first conv. Children 3i, 3i+1, 3i+2."""
  modules = []
  for i in range(num_convs):
    modules += [_conv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, dilation),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
  return nn.Sequential(*modules)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
  """The shortcut projection (1x1 conv + BN) iff the stride or the width changes."""
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
  """3x3 (stride, dilation[0]) -> BN -> ReLU -> 3x3 (dilation[1]) -> BN, + shortcut, ReLU."""
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, dilation: tuple[int, int]):
    super().__init__()
    self.conv1 = _conv(cin, planes, 3, stride, dilation[0])
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, 1, dilation[1])
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(cin, planes, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)), inplace=True)
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(y + shortcut, inplace=True)


class Bottleneck(nn.Module):
  """1x1 -> BN -> ReLU -> 3x3 (stride, dilation[1]) -> BN -> ReLU -> 1x1 (x4) -> BN, + shortcut."""
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, dilation: tuple[int, int]):
    super().__init__()
    self.conv1 = _conv(cin, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride, dilation[1])
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, planes * 4, 1)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = _downsample(cin, planes * 4, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)), inplace=True)
    y = F.relu(self.bn2(self.conv2(y)), inplace=True)
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(y + shortcut, inplace=True)


def _residual_stage(block, cin: int, planes: int, num_blocks: int, stride: int = 1,
                    dilation: int = 1, new_level: bool = True) -> tuple[nn.Sequential, int]:
  """fyu/drn `_make_layer`: (stage, output channels)."""
  first = (1, 1) if dilation == 1 else (dilation // 2 if new_level else dilation, dilation)
  blocks = [block(cin, planes, stride, first)]
  out = planes * block.expansion
  blocks += [block(out, planes, 1, (dilation, dilation)) for _ in range(1, num_blocks)]
  return nn.Sequential(*blocks), out


class DRNEncoder(nn.Module):
  """DRN-D without avgpool/fc: layer0 ... layer8, output stride 8, `channels[-1]` outputs."""

  def __init__(self, block: str, layers: tuple[int, ...], channels: tuple[int, ...]):
    super().__init__()
    if len(layers) != 8 or len(channels) != 8:
      raise ValueError(f"DRN-D needs 8 layer counts and 8 widths, got {layers}, {channels}")
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
    c, n = channels, layers
    self.layer0 = _conv_stack(3, c[0], 1, kernel=7)
    self.layer1 = _conv_stack(c[0], c[0], n[0])
    self.layer2 = _conv_stack(c[0], c[1], n[1], stride=2)
    width = c[1]
    self.layer3, width = _residual_stage(block_cls, width, c[2], n[2], stride=2)
    self.layer4, width = _residual_stage(block_cls, width, c[3], n[3], stride=2)
    self.layer5, width = _residual_stage(block_cls, width, c[4], n[4], dilation=2,
                                         new_level=False)
    self.layer6, width = _residual_stage(block_cls, width, c[5], n[5], dilation=4,
                                         new_level=False)
    self.layer7 = _conv_stack(width, c[6], n[6], dilation=2)
    self.layer8 = _conv_stack(c[6], c[7], n[7])
    self.out_channels = c[7]
    for m in self.modules():
      if isinstance(m, nn.Conv2d):  # He fan-out normal, untruncated (fyu/drn)
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))

  def forward(self, x):
    for k in range(9):
      x = getattr(self, f"layer{k}")(x)
    return x


def bilinear_upsample_kernel(factor: int = UPSAMPLE_FACTOR) -> np.ndarray:
  """The reference `fill_up_weights` kernel: [2f, 2f] outer product of the 1-D tent."""
  size = 2 * factor
  f = math.ceil(size / 2)
  center = (2 * f - 1 - f % 2) / (2.0 * f)
  taps = 1.0 - np.abs(np.arange(size) / f - center)
  return np.outer(taps, taps)


class UniversalNet(nn.Module):
  """Encoder + per-domain 1x1 heads `head_<d>` + 1x1 `embedding` conv + frozen upsampler.

  State-dict keys: `encoder.<drn_variables_to_torch name>`, `head_<d>.weight|bias`,
  `embedding.weight|bias`. The upsampling kernel is a non-persistent buffer.
  """

  def __init__(self, encoder: DRNEncoder, num_classes: tuple[int, ...], embedding_dim: int):
    super().__init__()
    self.encoder = encoder
    self.num_classes = tuple(num_classes)
    features = encoder.out_channels
    for d, classes in enumerate(self.num_classes):
      setattr(self, f"head_{d}", self._pointwise(features, classes))
    self.embedding = self._pointwise(features, embedding_dim) if embedding_dim > 0 else None
    kernel = torch.tensor(bilinear_upsample_kernel(), dtype=torch.float32)
    self.register_buffer("up_kernel", kernel[None, None], persistent=False)

  @staticmethod
  def _pointwise(cin: int, cout: int) -> nn.Conv2d:
    """1x1 conv with bias, reference init: weight N(0, 2 / cout), bias 0."""
    conv = nn.Conv2d(cin, cout, 1, bias=True)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / cout))
    nn.init.zeros_(conv.bias)
    return conv

  def upsample(self, x, out_hw):
    """The frozen depthwise ConvTranspose2d(C, C, 16, stride 8, padding 4, groups=C) with the
    bilinear kernel: [B, C, h, w] -> [B, C, 8h, 8w], cropped to out_hw."""
    channels = x.shape[1]
    kernel = self.up_kernel.to(x.dtype).expand(channels, 1, -1, -1)
    y = F.conv_transpose2d(x, kernel, stride=UPSAMPLE_FACTOR, padding=UPSAMPLE_FACTOR // 2,
                           groups=channels)
    return y[:, :, :out_hw[0], :out_hw[1]]

  def forward(self, x, domain: int | None = None, embedding: bool = False,
              upsample: bool = True):
    """x [B, 3, H, W] -> logits of head `domain` [B, C_d, H, W] or the embedding [B, D, H, W]
    (at the encoder's resolution [B, D, H/8, W/8] with upsample=False)."""
    feats = self.encoder(x)
    out = self.embedding(feats) if embedding else getattr(self, f"head_{domain}")(feats)
    return self.upsample(out, x.shape[2:]) if upsample else out


def build_model(args) -> UniversalNet:
  if args.encoder not in ENCODERS:
    raise SystemExit(f"--encoder {args.encoder!r}: choose one of {sorted(ENCODERS)}")
  block, layers = ENCODERS[args.encoder]
  channels = tuple(args.encoder_channels) or DEFAULT_CHANNELS
  encoder = DRNEncoder(block, layers, channels)
  return UniversalNet(encoder, tuple(args.classes), args.embedding_dim)


# ---------------------------------------------------------------------------- losses

def _at_least_f32(x):
  """bf16 (autocast) outputs -> float32 for the losses; float32/float64 unchanged."""
  return x if x.dtype in (torch.float32, torch.float64) else x.float()


def pixel_cross_entropy(logits, labels):
  """Mean over non-ignored pixels of -log softmax(logits)[label]; 0 when all are ignored."""
  nll = F.cross_entropy(_at_least_f32(logits), labels, ignore_index=IGNORE_LABEL, reduction="sum")
  valid = (labels != IGNORE_LABEL).sum().clamp(min=1)
  return nll / valid


def softmax_entropy_mean(scores):
  """Mean over B, H, W of the entropy (nats) of softmax over the channel axis of [B, M, H, W]."""
  log_probs = F.log_softmax(scores, dim=1)
  return -(log_probs.exp() * log_probs).sum(dim=1).mean()


def entropy_terms(pixel_embedding, prototypes, domain: int, alpha: float, beta: float,
                  upsample=None):
  """(cross, within) entropies of an unlabeled batch of `domain` (None where not computed).

  prototypes: per-domain L2-normalised label embeddings [M_k, D]. All domains' scores
  come from one bias-free 1x1 convolution (the reference's dot product) and are split.
  upsample: for a low-resolution pixel embedding, the linear upsampler applied to the
  scores (the same scores as from the upsampled embedding, at M / D of the cost).
  """
  emb = _at_least_f32(pixel_embedding)
  stacked = torch.cat(prototypes, dim=0).to(emb.dtype)[:, :, None, None]
  scores = F.conv2d(emb, stacked)
  if upsample is not None:
    scores = upsample(scores)
  scores = torch.split(scores, [p.shape[0] for p in prototypes], dim=1)
  within = softmax_entropy_mean(scores[domain]) if beta != 0 else None
  cross = None
  others = [s for k, s in enumerate(scores) if k != domain]
  if alpha != 0 and others:
    cross = sum(softmax_entropy_mean(s) for s in others) / len(others)
  return cross, within


def normalize_rows(x, eps: float = 1e-12):
  return x / x.norm(dim=1, keepdim=True).clamp(min=eps)


# ---------------------------------------------------------------------------- step

def uses_unlabeled(args) -> bool:
  return args.method != "basic" and (args.alpha != 0 or args.beta != 0) and args.unlabeled > 0


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
  """SGD(momentum 0.9, coupled weight decay 1e-4); gradients preallocated so that every
  parameter (also one without gradient this step) is decayed and moved, as with optax."""
  params = [p for p in model.parameters() if p.requires_grad]
  for p in params:
    p.grad = torch.zeros_like(p)
  return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def train_step(model, optimizer, batch, prototypes, args, names, autocast,
               grad_norm: bool = False) -> dict:
  """One step over every domain; returns the loss terms (floats, before the update).

  With `grad_norm` also the global gradient norm (as usss_jax's "grad_norm" metric).
  """
  optimizer.zero_grad(set_to_none=False)
  alpha = args.alpha if args.method != "basic" else 0.0
  beta = args.beta if args.method == "full" else 0.0
  sup, cross, within, terms = [], [], [], {}
  for d, name in enumerate(names):
    lab = batch[d]["labeled"]
    with autocast():
      logits = model(lab["image"], domain=d)
    sup_d = pixel_cross_entropy(logits, lab["label"])
    sup.append(sup_d)
    terms[f"supervised/{name}"] = sup_d
    if "unlabeled" not in batch[d]:
      continue
    images = batch[d]["unlabeled"]["image"]
    low_res = args.low_res_scores
    with autocast():
      emb = model(images, embedding=True, upsample=not low_res)
    upsample = (lambda s, hw=images.shape[2:]: model.upsample(s, hw)) if low_res else None
    c, w = entropy_terms(emb, prototypes, d, alpha, beta, upsample)
    if c is not None:
      cross.append(c)
      terms[f"cross/{name}"] = c
    if w is not None:
      within.append(w)
      terms[f"within/{name}"] = w
  zero = torch.zeros((), dtype=sup[0].dtype, device=sup[0].device)
  total = sum(sup, zero) + alpha * sum(cross, zero) + beta * sum(within, zero)
  total.backward()
  terms["loss"] = total
  metrics = {k: float(v.detach()) for k, v in terms.items()}
  if grad_norm:
    grads = [p.grad.detach().double().pow(2).sum() for p in optimizer.param_groups[0]["params"]]
    metrics["grad_norm"] = float(torch.stack(grads).sum().sqrt())
  optimizer.step()
  return metrics


# ---------------------------------------------------------------------------- inputs

def random_inputs(args, memory_format) -> tuple[list, list]:
  """(batch, label embeddings) drawn as benchmarks/train_step.py and random_embeddings do."""
  rng = np.random.default_rng(args.seed)
  hw = (args.height, args.width)
  batch = []
  for classes in args.classes:
    entry = {"labeled": {
        "image": rng.standard_normal((args.labeled, *hw, 3), np.float32),
        "label": rng.integers(0, classes, (args.labeled, *hw), dtype=np.int32)}}
    if uses_unlabeled(args):
      entry["unlabeled"] = {"image": rng.standard_normal((args.unlabeled, *hw, 3), np.float32)}
    batch.append(entry)
  embeddings = [np.random.default_rng(args.seed + i).normal(size=(c, args.embedding_dim))
                .astype(np.float32) for i, c in enumerate(args.classes)]
  return _to_torch_batch(batch, memory_format), embeddings


def _to_torch_batch(batch: list, memory_format) -> list:
  """NHWC NumPy images -> NCHW float32 tensors; labels -> int64."""
  out = []
  for entry in batch:
    conv = {}
    for split, arrays in entry.items():
      conv[split] = {"image": torch.from_numpy(np.ascontiguousarray(
          np.asarray(arrays["image"], np.float32).transpose(0, 3, 1, 2))).contiguous(
              memory_format=memory_format)}
      if "label" in arrays:
        conv[split]["label"] = torch.from_numpy(np.asarray(arrays["label"], np.int64))
    out.append(conv)
  return out


def read_inputs(path: str, args) -> dict:
  """Reads an --inputs archive; sets args' shape fields (classes, sizes) from it.

  Returns {"state_dict", "batch" (NumPy, NHWC), "label_embeddings", "names" or None}.
  """
  if not os.path.isfile(path):
    raise SystemExit(f"--inputs {path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise SystemExit(f"{path}: not a readable .npz archive ({e})") from e
  num = 0
  while f"head_{num}/weight" in data:
    num += 1
  if num == 0:
    raise SystemExit(f"{path}: no head_0/weight: not an --inputs archive")
  args.classes = tuple(int(data[f"head_{d}/weight"].shape[0]) for d in range(num))
  if "embedding/weight" in data:
    args.embedding_dim = int(data["embedding/weight"].shape[0])
  elif args.method == "basic":
    args.embedding_dim = 0
  else:
    raise SystemExit(f"{path}: method {args.method!r} needs embedding/weight")
  state = {key.replace("/", ".", 1): torch.from_numpy(np.array(value))
           for key, value in data.items()
           if key.split("/", 1)[0] in ("encoder", "embedding") or key.startswith("head_")}
  batch, embeddings = [], []
  for d in range(num):
    try:
      entry = {"labeled": {"image": data[f"batch/{d}/labeled/image"],
                           "label": data[f"batch/{d}/labeled/label"]}}
    except KeyError as e:
      raise SystemExit(f"{path}: missing {e}") from e
    unlabeled = data.get(f"batch/{d}/unlabeled/image")
    if unlabeled is not None and unlabeled.shape[0] > 0:
      entry["unlabeled"] = {"image": unlabeled}
    batch.append(entry)
    if f"label_embeddings/{d}" in data:
      embeddings.append(np.asarray(data[f"label_embeddings/{d}"], np.float32))
  first = batch[0]["labeled"]["image"]
  args.labeled, args.height, args.width = (int(v) for v in first.shape[:3])
  args.unlabeled = int(batch[0]["unlabeled"]["image"].shape[0]) if "unlabeled" in batch[0] else 0
  if uses_unlabeled(args):
    if len(embeddings) != num or any("unlabeled" not in e for e in batch):
      raise SystemExit(f"{path}: method {args.method!r} needs batch/<d>/unlabeled/image and "
                       f"label_embeddings/<d> for every domain 0..{num - 1}")
  else:
    for entry in batch:
      entry.pop("unlabeled", None)
  names = [str(n) for n in data["domain_names"]] if "domain_names" in data else None
  return {"state_dict": state, "batch": batch, "label_embeddings": embeddings, "names": names}


# ---------------------------------------------------------------------------- run

def _int_list(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="full", choices=METHODS)
  parser.add_argument("--alpha", type=float, default=1.0,
                      help="weight of the cross-domain entropy")
  parser.add_argument("--beta", type=float, default=1.0,
                      help="weight of the within-domain entropy")
  parser.add_argument("--encoder", default="drn_d_22", choices=sorted(ENCODERS))
  parser.add_argument("--encoder-channels", type=_int_list, default=(),
                      help="8 comma-separated widths (default: the standard DRN-D widths)")
  parser.add_argument("--classes", type=_int_list, default=(19, 26),
                      help="classes per domain, e.g. 19,26")
  parser.add_argument("--height", type=int, default=256)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--labeled", type=int, default=2, help="labeled images per domain")
  parser.add_argument("--unlabeled", type=int, default=2, help="unlabeled images per domain")
  parser.add_argument("--embedding-dim", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--device", default="cpu",
                      help="torch device of the model and the batch (cpu, cuda)")
  parser.add_argument("--channels-last", action="store_true",
                      help="channels_last memory format for the model and the images")
  parser.add_argument("--bf16", action="store_true",
                      help="forward under torch.autocast(<device>, torch.bfloat16); losses "
                           "float32")
  parser.add_argument("--low-res-scores", action="store_true",
                      help="entropy scores at the encoder's resolution, then upsampled (what "
                      "usss_jax's step does; exact), instead of upsampling the D-dim embedding "
                      "first (the reference's order)")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0, help="torch init and NumPy input seed")
  parser.add_argument("--inputs", default="",
                      help=".npz of initial weights + batch from the JAX side (see docstring)")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object instead of the table")
  parser.add_argument("--json-out", default="", help="also write the JSON object to this file")
  args = parser.parse_args(argv)
  if args.encoder_channels and len(args.encoder_channels) != 8:
    parser.error(f"--encoder-channels needs 8 widths, got {len(args.encoder_channels)}")
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.method == "cross":
    args.beta = 0.0
  return args


def _load_average():
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _peak_rss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def run(args) -> dict:
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  loaded = read_inputs(args.inputs, args) if args.inputs else None
  names = (loaded["names"] if loaded and loaded["names"] else
           [f"domain{i}" for i in range(len(args.classes))])
  model = build_model(args)
  if loaded:
    try:
      model.load_state_dict(loaded["state_dict"], strict=True)
    except RuntimeError as e:
      raise SystemExit(f"{args.inputs} does not fit --encoder {args.encoder} --encoder-channels "
                       f"{','.join(map(str, args.encoder_channels)) or '(default)'}:\n{e}") from e
    batch = _to_torch_batch(loaded["batch"], memory_format)
    embeddings = loaded["label_embeddings"]
  else:
    batch, embeddings = random_inputs(args, memory_format)
  device = torch.device(args.device)
  cuda = device.type == "cuda"
  torch.backends.cudnn.benchmark = cuda
  model = model.to(device=device, memory_format=memory_format).train()
  batch = [{split: {k: v.to(device) for k, v in arrays.items()} for split, arrays in entry.items()}
           for entry in batch]
  prototypes = [normalize_rows(torch.from_numpy(e)).to(device) for e in embeddings]
  optimizer = make_optimizer(model, args.lr)
  num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
  autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16
              else contextlib.nullcontext)

  def step(grad_norm=False):
    metrics = train_step(model, optimizer, batch, prototypes, args, names, autocast, grad_norm)
    if cuda:  # the optimizer's update is still queued: time the whole step
      torch.cuda.synchronize(device)
    return metrics

  load_start = _load_average()
  check, second_loss, warmup_times = None, None, []
  if loaded:  # the check step: initial weights, first warm-up step
    start = time.perf_counter()
    check = step(grad_norm=True)
    warmup_times.append(time.perf_counter() - start)
  for _ in range(max(args.warmup - len(warmup_times), 0)):
    start = time.perf_counter()
    metrics = step()
    warmup_times.append(time.perf_counter() - start)
    second_loss = metrics["loss"] if second_loss is None else second_loss
  times = []
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  for _ in range(args.steps):
    start = time.perf_counter()
    metrics = step()
    times.append(time.perf_counter() - start)
    second_loss = metrics["loss"] if second_loss is None else second_loss
  wall = time.perf_counter() - wall_start
  cpu = time.process_time() - cpu_start

  unlabeled = args.unlabeled if uses_unlabeled(args) else 0
  images = len(names) * (args.labeled + unlabeled)
  seconds = statistics.median(times)
  return {
      "benchmark": "torch_train_step",
      "torch_version": torch.__version__,
      "threads": torch.get_num_threads(),
      "python": platform.python_version(),
      "host_cpus": os.cpu_count(),
      "load_average": load_start,
      "load_average_end": _load_average(),
      "setup": {
          "encoder": args.encoder, "encoder_channels": list(args.encoder_channels) or None,
          "method": args.method, "alpha": args.alpha if args.method != "basic" else 0.0,
          "beta": args.beta if args.method == "full" else 0.0,
          "classes": list(args.classes), "domain_names": list(names),
          "embedding_dim": args.embedding_dim,
          "height": args.height, "width": args.width, "labeled_per_domain": args.labeled,
          "unlabeled_per_domain": unlabeled, "low_res_scores": args.low_res_scores,
          "channels_last": args.channels_last,
          "bf16": args.bf16, "lr": args.lr, "seed": args.seed, "params": int(num_params),
          "inputs": args.inputs or None, "warmup": args.warmup, "steps": args.steps,
      },
      "seconds_per_step": seconds,
      "seconds_min": min(times),
      "seconds_max": max(times),
      "times_s": times,
      "warmup_s": warmup_times,
      "images_per_step": images,
      "images_per_s": images / seconds,
      "busy_cores": cpu / wall if wall > 0 else float("nan"),
      "peak_rss_bytes": _peak_rss_bytes(),
      "device": str(device),
      "device_name": torch.cuda.get_device_name(device) if cuda else None,
      "device_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
      "check": check,
      "check_second_step_loss": second_loss if check is not None else None,
      "final_loss": metrics["loss"],
  }


def table(r: dict) -> str:
  s = r["setup"]
  widths = f" widths {s['encoder_channels']}" if s["encoder_channels"] else ""
  flags = "".join([", low-res scores" if s["low_res_scores"] else "",
                   ", channels_last" if s["channels_last"] else "", ", bf16" if s["bf16"] else ""])
  lines = [
      f"torch train step: {s['encoder']}{widths}, method {s['method']} (alpha={s['alpha']:g}, "
      f"beta={s['beta']:g}), domains {s['classes']} classes, per domain "
      f"{s['labeled_per_domain']}+{s['unlabeled_per_domain']} images {s['height']}x{s['width']}, "
      f"D={s['embedding_dim']}, {s['params']:,} params{flags}",
      f"torch {r['torch_version']} on {r['device_name'] or r['device']}, {r['threads']} threads, "
      f"python {r['python']}, host cpus "
      f"{r['host_cpus']}, load average {r['load_average']}",
  ]
  pairs = [
      ("seconds/step (median)", f"{r['seconds_per_step']:.3f}"),
      ("  min / max", f"{r['seconds_min']:.3f} / {r['seconds_max']:.3f}"),
      (f"  timed steps ({s['steps']}, after {len(r['warmup_s'])} warm-ups)",
       ", ".join(f"{t:.3f}" for t in r["times_s"])),
      ("images/s (labeled+unlabeled)", f"{r['images_per_s']:.3f}"),
      ("busy cores (CPU s / wall s)", f"{r['busy_cores']:.2f}"),
      ("peak RSS MiB", f"{r['peak_rss_bytes'] / 2 ** 20:.1f}"),
      *([("peak device MiB", f"{r['device_peak_bytes'] / 2 ** 20:.1f}")]
        if r["device_peak_bytes"] is not None else []),
      ("loss of the last timed step", f"{r['final_loss']:.6f}"),
      ("load average end", str(r["load_average_end"])),
  ]
  if r["check"] is not None:
    pairs += [(f"check (first step) {k}", f"{v:.7g}") for k, v in r["check"].items()]
    pairs.append(("check: loss of the second step", f"{r['check_second_step_loss']:.7g}"))
  width = max(len(k) for k, _ in pairs)
  return "\n".join(lines + [f"{k.ljust(width)}  {v}" for k, v in pairs])


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  text = json.dumps(result, indent=1)
  print(text if args.json else table(result), flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
