"""Analyses beyond the paper: label-space-agnostic prediction, label correspondence, t-SNE.

  python -m usss_jax.visualize predict_any --config=configs/demo.py --workdir=runs/demo \\
      --input=some/images --label_space=indoor --output=out/any
  python -m usss_jax.visualize correspondence --config=configs/demo.py --workdir=runs/demo \\
      --domain_a=street --domain_b=indoor --output=out/corr
  python -m usss_jax.visualize tsne --config=configs/demo.py --workdir=runs/full \\
      --output=out/tsne.png [--compare_workdir=runs/basic --labels=basic,full]

1. predict_any: the entropy module embeds every pixel in the space of the label
   embeddings, so any domain's L2-normalised prototype matrix [C*K, D] is a 1x1
   convolution kernel that turns the pixel embedding into scores for that
   domain's classes (best of each class's K prototypes). This segments any image
   in any training domain's label set without a head of its own. Its agreement
   with the domain's head and its mIoU on the domain's evaluation split are
   reported alongside.
2. correspondence: which classes of domain A align with which of domain B,
   (a) from the cosine similarity of their label embeddings, (b) from data: A's
   ground truth against B's head predictions on A's evaluation images.
3. tsne: encoder features (1/8 resolution, labels at cell centres) sampled per
   class and domain, embedded with t-SNE (the paper's Figure 4); one panel per run.

Everything runs on one device (the first local one): these are small offline
analyses, and a single device keeps them cheap on a CPU-only host.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from usss_jax import losses
from usss_jax import runtime
from usss_jax import train as train_lib
from usss_jax.data import base as data_base

COMMANDS = ("predict_any", "correspondence", "tsne")
IGNORE_LABEL = data_base.IGNORE_LABEL
_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


# ---------------------------------------------------------------------------- pure maths

def prototype_logits(pixel_embedding: jax.Array, label_embeddings: jax.Array, k: int = 1, *,
                     normalize_pixels: bool = False) -> jax.Array:
  """Class scores of every pixel from a domain's prototypes, as one 1x1 convolution.

  Args:
    pixel_embedding: [B, H, W, D] output of the entropy module.
    label_embeddings: [C*K, D] a domain's label embeddings, class-major (rows
      c*K .. c*K+K-1 belong to class c); rows are L2-normalised here.
    k: prototypes per class, K.
    normalize_pixels: cosine scores instead of the dot product with the raw pixel
      embedding (same argmax: a pixel's norm scales all its scores alike).
  Returns:
    [B, H, W, C] float32: for each class the best score over its K prototypes.
  """
  if pixel_embedding.ndim != 4:
    raise ValueError(f"pixel_embedding must be [B, H, W, D], got shape {pixel_embedding.shape}")
  dim = pixel_embedding.shape[-1]
  if label_embeddings.ndim != 2 or label_embeddings.shape[1] != dim:
    raise ValueError(f"label_embeddings must be [C*K, {dim}] to match the pixel embedding, "
                     f"got shape {label_embeddings.shape}")
  rows = label_embeddings.shape[0]
  if k < 1 or rows % k:
    raise ValueError(f"{rows} label-embedding rows are not a multiple of k={k} prototypes "
                     "per class")
  x = pixel_embedding.astype(jnp.float32)
  if normalize_pixels:
    x = losses.normalize_rows(x)
  # The normalised prototype matrix is the kernel of a 1x1 conv: [1, 1, D, C*K] (HWIO).
  kernel = losses.normalize_rows(label_embeddings.astype(jnp.float32)).T[None, None]
  scores = jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
  return losses.reduce_prototypes(scores, k, "max")


def prototype_similarity(embeddings_a: np.ndarray, embeddings_b: np.ndarray, k_a: int = 1,
                         k_b: int = 1) -> np.ndarray:
  """Cosine similarity of two domains' classes from their label embeddings.

  Args:
    embeddings_a: [C_A*K_A, D] class-major label embeddings of domain A.
    embeddings_b: [C_B*K_B, D] of domain B.
    k_a, k_b: prototypes per class of each.
  Returns:
    [C_A, C_B] float64: for each class pair the best cosine over their prototype pairs.
  """
  a = np.asarray(embeddings_a, np.float64)
  b = np.asarray(embeddings_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"label embeddings must be [M, D] with the same D, got {a.shape} and "
                     f"{b.shape}")
  for name, e, k in (("A", a, k_a), ("B", b, k_b)):
    if k < 1 or e.shape[0] % k:
      raise ValueError(f"domain {name}: {e.shape[0]} rows are not a multiple of k={k}")
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  cos = a @ b.T  # [C_A*K_A, C_B*K_B]
  cos = cos.reshape(a.shape[0] // k_a, k_a, b.shape[0] // k_b, k_b)
  return cos.max(axis=(1, 3))


def cooccurrence(labels_a: np.ndarray, predictions_b: np.ndarray, num_classes_a: int,
                 num_classes_b: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Counts how often a pixel of A's class i is predicted as B's class j.

  Args:
    labels_a: [...] A's ground-truth ids; `ignore_label` (or ids >= C_A) do not count.
    predictions_b: [...] same shape, B's predicted ids in [0, C_B).
    num_classes_a, num_classes_b: C_A, C_B.
  Returns:
    [C_A, C_B] int64 counts.
  """
  labels_a = np.asarray(labels_a).reshape(-1).astype(np.int64)
  predictions_b = np.asarray(predictions_b).reshape(-1).astype(np.int64)
  if labels_a.shape != predictions_b.shape:
    raise ValueError(f"labels ({labels_a.size} pixels) and predictions "
                     f"({predictions_b.size} pixels) differ in size")
  valid = (labels_a != ignore_label) & (labels_a >= 0) & (labels_a < num_classes_a)
  bad = valid & ((predictions_b < 0) | (predictions_b >= num_classes_b))
  if bad.any():
    raise ValueError(f"predictions hold ids outside [0, {num_classes_b}): "
                     f"{np.unique(predictions_b[bad])[:10].tolist()}")
  index = labels_a[valid] * num_classes_b + predictions_b[valid]
  counts = np.bincount(index, minlength=num_classes_a * num_classes_b)
  return counts.reshape(num_classes_a, num_classes_b).astype(np.int64)


def row_normalize(matrix: np.ndarray) -> np.ndarray:
  """[R, C] -> [R, C] float64 rows summing to 1 (all-zero rows stay 0)."""
  m = np.asarray(matrix, np.float64)
  sums = m.sum(axis=1, keepdims=True)
  return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def best_matches(matrix: np.ndarray, names_a: Sequence[str], names_b: Sequence[str],
                 valid_rows: np.ndarray | None = None) -> list[dict]:
  """For each row (class of A) its best column (class of B) and the score.

  Args:
    matrix: [C_A, C_B] scores (higher = better match).
    names_a, names_b: class names of A and B.
    valid_rows: optional [C_A] bool; rows without evidence get match None.
  Returns:
    C_A dicts {"class_a", "class_b", "score", "runner_up", "runner_up_score"}.
  """
  m = np.asarray(matrix, np.float64)
  if m.shape != (len(names_a), len(names_b)):
    raise ValueError(f"matrix shape {m.shape} does not fit {len(names_a)} x {len(names_b)} "
                     "class names")
  out = []
  for i, name in enumerate(names_a):
    row = {"class_a": name, "class_b": None, "score": None, "runner_up": None,
           "runner_up_score": None}
    if valid_rows is None or valid_rows[i]:
      order = np.argsort(-m[i], kind="stable")
      row.update(class_b=names_b[order[0]], score=float(m[i, order[0]]))
      if len(order) > 1:
        row.update(runner_up=names_b[order[1]], runner_up_score=float(m[i, order[1]]))
    out.append(row)
  return out


def sample_per_class(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Indices of at most `per_class` entries of each class present in `labels` [N].

  Returns:
    [M] int64 sorted indices (ignore entries never chosen).
  """
  labels = np.asarray(labels).reshape(-1)
  chosen = []
  for c in np.unique(labels):
    if c == ignore_label:
      continue
    idx = np.flatnonzero(labels == c)
    if len(idx) > per_class:
      idx = rng.choice(idx, per_class, replace=False)
    chosen.append(idx)
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


def tsne_points(features: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
  """2-D t-SNE of feature rows [N, F] -> [N, 2] float64 (fixed random_state).

  The perplexity is capped at (N - 1) / 3 so that small samples work too.
  """
  from sklearn.manifold import TSNE
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or len(x) < 4:
    raise ValueError(f"t-SNE needs [N >= 4, F] features, got shape {x.shape}")
  perplexity = float(min(perplexity, (len(x) - 1) / 3.0))
  return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed).fit_transform(x)


# ---------------------------------------------------------------------------- figures

def _figure(**kwargs):
  # Object-oriented Figure + Agg canvas: no pyplot global state, no backend switch.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def plot_heatmap(matrix: np.ndarray, row_names: Sequence[str], col_names: Sequence[str],
                 path: str, *, title: str, xlabel: str, ylabel: str,
                 vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
                 annotate_limit: int = 400) -> str:
  """Writes a [R, C] heat map with class names on the axes to `path` (PNG).

  Values are printed in the cells when R * C <= annotate_limit.
  """
  m = np.asarray(matrix, np.float64)
  rows, cols = m.shape
  if (rows, cols) != (len(row_names), len(col_names)):
    raise ValueError(f"matrix shape {m.shape} does not fit {len(row_names)} row and "
                     f"{len(col_names)} column names")
  fig = _figure(figsize=(max(4.5, 0.65 * cols + 3.0), max(3.5, 0.5 * rows + 2.0)),
                layout="constrained", dpi=120)
  ax = fig.add_subplot()
  image = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
  ax.set_xticks(range(cols), labels=list(col_names), rotation=45, ha="right",
                rotation_mode="anchor")
  ax.set_yticks(range(rows), labels=list(row_names))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  fig.colorbar(image, ax=ax, shrink=0.9)
  if rows * cols <= annotate_limit:
    for i in range(rows):
      for j in range(cols):
        # Dark text on light cells and vice versa, whatever the colour map.
        r, g, b, _ = image.cmap(image.norm(m[i, j]))
        colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
  _makedirs_for(path)
  fig.savefig(path)
  return path


@dataclasses.dataclass
class TsnePanel:
  """One t-SNE panel: points with their (domain, class) keys.

  Attributes:
    title: panel title.
    points: [N, 2] t-SNE coordinates.
    domain_ids: [N] index into `domain_names`.
    class_ids: [N] class id within the point's domain.
    domain_names: the run's domains.
    class_names: per domain, its class names.
  """
  title: str
  points: np.ndarray
  domain_ids: np.ndarray
  class_ids: np.ndarray
  domain_names: tuple[str, ...]
  class_names: tuple[tuple[str, ...], ...]


def plot_tsne(panels: Sequence[TsnePanel], path: str) -> str:
  """Scatter plots side by side: colour = (domain, class), marker = domain; one legend."""
  from matplotlib import colormaps
  from matplotlib.lines import Line2D
  if not panels:
    raise ValueError("plot_tsne needs at least one panel")
  # The same (domain, class) key gets the same colour in every panel.
  keys: list[tuple[str, str]] = []
  for p in panels:
    for d, names in zip(p.domain_names, p.class_names):
      keys.extend((d, c) for c in names if (d, c) not in keys)
  domains = list(dict.fromkeys(d for d, _ in keys))
  cmap = colormaps["tab10" if len(keys) <= 10 else "tab20" if len(keys) <= 20 else "turbo"]
  colours = {key: cmap(i / max(len(keys) - 1, 1)) if len(keys) > 20 else cmap(i)
             for i, key in enumerate(keys)}
  markers = {d: _MARKERS[i % len(_MARKERS)] for i, d in enumerate(domains)}
  fig = _figure(figsize=(5.5 * len(panels) + 2.2, 5.5), layout="constrained", dpi=120)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, p in zip(axes, panels):
    for d, dname in enumerate(p.domain_names):
      for c, cname in enumerate(p.class_names[d]):
        sel = (p.domain_ids == d) & (p.class_ids == c)
        if sel.any():
          ax.scatter(p.points[sel, 0], p.points[sel, 1], s=12, alpha=0.75,
                     color=colours[(dname, cname)], marker=markers[dname], linewidths=0)
    ax.set_title(p.title)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [Line2D([], [], linestyle="", marker=markers[d], color=colours[(d, c)],
                    markersize=7, label=f"{d}: {c}") for d, c in keys]
  fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
  _makedirs_for(path)
  fig.savefig(path)
  return path


def plot_legend(class_names: Sequence[str], palette: np.ndarray, path: str,
                title: str = "") -> str:
  """Colour key of a label space (class name next to its palette colour)."""
  from matplotlib.patches import Patch
  fig = _figure(figsize=(2.6, 0.3 * len(class_names) + 0.6), dpi=120)
  handles = [Patch(color=np.asarray(palette[i], np.float64) / 255.0, label=name)
             for i, name in enumerate(class_names)]
  fig.legend(handles=handles, loc="center", frameon=False, title=title or None)
  _makedirs_for(path)
  fig.savefig(path, bbox_inches="tight")
  return path


def _makedirs_for(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


# ---------------------------------------------------------------------------- model access

def _one_device_sharding() -> NamedSharding:
  return NamedSharding(Mesh(np.array(jax.local_devices()[:1]), ("data",)), P())


def restore_state(config: ml_collections.ConfigDict, workdir: str, which: str = "best"):
  """(model, state, domains, step) from `workdir`'s best (else latest) or latest checkpoint.

  Unlike `runtime.restore_model` this keeps the whole train state, in particular
  `state["label_embeddings"]` (which EMA may have moved away from the saved
  files), and places it on one local device.
  """
  return runtime.restore_state(config, workdir, which, sharding=_one_device_sharding())


def domain_label_embeddings(config: ml_collections.ConfigDict, workdir: str, state: dict,
                            domains: Sequence[train_lib.Domain], index: int) -> np.ndarray:
  """[C*K, D] float32 label embeddings of domain `index`: the checkpoint's, else the saved file.

  A run whose method does not use label embeddings keeps zero placeholders in its
  state; then `<workdir>/label_embeddings/<name>.npz` is used if it exists.
  """
  from usss_jax import embedding_stage, embeddings as emb_lib
  dom = domains[index]
  k = int(config.embeddings_per_class)
  emb = np.asarray(jax.device_get(state["label_embeddings"][index]), np.float32)
  if not np.any(np.linalg.norm(emb, axis=1) > 0):
    path = os.path.join(embedding_stage.embeddings_dir(workdir), f"{dom.name}.npz")
    if not os.path.exists(path):
      raise ValueError(
          f"{workdir}: the checkpoint holds no label embeddings for domain {dom.name!r} "
          f"(method {config.method!r} does not train with them) and {path} does not exist")
    emb = np.asarray(emb_lib.LabelEmbeddings.load(path).embeddings, np.float32)
  if emb.shape[0] != dom.num_classes * k:
    raise ValueError(f"{workdir}: label embeddings of {dom.name!r} have {emb.shape[0]} rows, "
                     f"expected {dom.num_classes} classes x {k} prototypes")
  if int(config.embedding_dim) and emb.shape[1] != int(config.embedding_dim):
    raise ValueError(f"{workdir}: label embeddings of {dom.name!r} have dimension "
                     f"{emb.shape[1]}, the model's embedding_dim is {config.embedding_dim}")
  return emb


def _variables(state: dict) -> dict:
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


@functools.lru_cache(maxsize=16)
def make_forward(model, k: int = 1, normalize_pixels: bool = False):
  """jitted `(variables, images [B,h,w,3], label_embeddings tuple, out_hw) -> (heads, protos)`.

  heads: per domain [B, H, W] int32 head argmax at `out_hw`; protos: per entry of
  `label_embeddings` [B, H, W] int32 prototype argmax (empty when it is empty).
  Scores are resized bilinearly to `out_hw` before the argmax, as in evaluation.
  Cached per (model, k, normalize_pixels), so the commands share compilations.
  """
  @functools.partial(jax.jit, static_argnums=(3,))
  def forward(variables, images, label_embeddings, out_hw):
    out = model.apply(variables, images, train=False, domain=None, logits=True,
                      embedding=bool(label_embeddings))

    def to_ids(scores):
      scores = scores.astype(jnp.float32)
      if scores.shape[1:3] != tuple(out_hw):
        scores = jax.image.resize(scores, (scores.shape[0], *out_hw, scores.shape[-1]),
                                  "bilinear")
      return jnp.argmax(scores, axis=-1).astype(jnp.int32)

    heads = tuple(to_ids(logits) for logits in out["logits"])
    protos = tuple(to_ids(prototype_logits(out["embedding"], e, k,
                                           normalize_pixels=normalize_pixels))
                   for e in label_embeddings)
    return heads, protos

  return forward


def _network_input(image: np.ndarray, dom_config, normalization: str) -> np.ndarray:
  """[H, W, 3] uint8 -> [1, h, w, 3] float32 as evaluation feeds it."""
  from usss_jax import evaluate
  from usss_jax.data import transforms
  eval_resize = tuple(dom_config.get("eval_resize", ()))
  net_in = evaluate._resize_image(image, eval_resize) if eval_resize else image
  return transforms.normalize(net_in, normalization)[None]


def prototype_agreement(model, variables, dom: train_lib.Domain, index: int,
                        label_embeddings: np.ndarray, *, k: int, normalization: str,
                        normalize_pixels: bool = False, max_images: int = 0,
                        forward=None) -> dict:
  """Prototype prediction vs the domain's own head on its evaluation split.

  Args:
    model, variables: the universal model and its {"params", "batch_stats"}.
    dom: the domain (reader, evaluation examples, eval_resize); `index` its head.
    label_embeddings: [C*K, D] the domain's label embeddings.
    k, normalize_pixels: see `prototype_logits`.
    normalization: input normalisation (as in training).
    max_images: use the first `max_images` evaluation images (0 = all).
    forward: a `make_forward(model, k, normalize_pixels)` to reuse (default: that).
  Returns:
    {"domain", "num_images", "agreement": fraction of labelled pixels where both
    argmaxes agree, "agreement_all_pixels", "head": {"miou", "pixel_accuracy",
    "iou"}, "prototypes": {same}} (mIoU with absent classes excluded).
  """
  from usss_jax import metrics
  examples = dom.eval_examples[:max_images] if max_images > 0 else dom.eval_examples
  if not examples:
    raise ValueError(f"domain {dom.name!r} has no evaluation examples "
                     f"(eval_split={dom.config.eval_split!r})")
  forward = forward or make_forward(model, k, normalize_pixels)
  c = dom.num_classes
  cm_head = np.zeros((c, c + 1), np.int64)
  cm_proto = np.zeros((c, c + 1), np.int64)
  same_valid = valid = same_all = total = 0
  embs = (jnp.asarray(label_embeddings),)
  for ex in examples:
    item = dom.reader.load_example(ex)
    label = item["label"].astype(np.int32)
    heads, protos = forward(variables, _network_input(item["image"], dom.config, normalization),
                            embs, label.shape)
    head, proto = np.asarray(heads[index])[0], np.asarray(protos[0])[0]
    cm_head += np.asarray(metrics.confusion_matrix(head, label, c))
    cm_proto += np.asarray(metrics.confusion_matrix(proto, label, c))
    mask = label != IGNORE_LABEL
    same = head == proto
    same_valid += int(np.sum(same & mask))
    valid += int(np.sum(mask))
    same_all += int(np.sum(same))
    total += same.size

  def summary(cm):
    iou, miou = metrics.iou_from_confusion(cm)
    return {"miou": miou, "pixel_accuracy": metrics.pixel_accuracy(cm),
            "iou": {n: (None if np.isnan(v) else float(v))
                    for n, v in zip(dom.reader.spec.classes, iou)}}

  return {"domain": dom.name, "num_images": len(examples),
          "agreement": same_valid / valid if valid else float("nan"),
          "agreement_all_pixels": same_all / total,
          "head": summary(cm_head), "prototypes": summary(cm_proto)}


# ---------------------------------------------------------------------------- commands

def _domain_index(domains, name: str | None, flag: str) -> int:
  names = [d.name for d in domains]
  if not name:
    raise ValueError(f"--{flag} is required: one of {names}")
  if name not in names:
    raise ValueError(f"--{flag}={name!r}: not one of this config's domains {names}")
  return names.index(name)


def _write_json(path: str, obj) -> str:
  _makedirs_for(path)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  return path


def predict_any(config: ml_collections.ConfigDict, workdir: str, input_path: str, *,
                label_space: str, output: str | None = None, which: str = "best",
                max_images: int = 0) -> dict:
  """Segments every image under `input_path` in `label_space`'s classes via its prototypes.

  Writes `<stem>_mask.png` (class ids), `<stem>_color.png`, `<stem>_overlay.png`,
  `legend.png`, and `agreement.json` (prototypes vs the domain's head on its own
  evaluation split), and returns a summary.
  """
  from PIL import Image
  from usss_jax.data import base
  if int(config.embedding_dim) <= 0:
    raise ValueError("predict_any needs the entropy module: config.embedding_dim is 0")
  model, state, domains, step = restore_state(config, workdir, which)
  index = _domain_index(domains, label_space, "label_space")
  dom = domains[index]
  k = int(config.embeddings_per_class)
  embs = domain_label_embeddings(config, workdir, state, domains, index)
  variables = _variables(state)
  output = output or os.path.join(workdir, "visualize", f"predict_any_{dom.name}")
  os.makedirs(output, exist_ok=True)
  palette = dom.reader.spec.palette_array()
  forward = make_forward(model, k, bool(config.normalize_pixels))
  written = []
  for path in runtime._list_images(input_path):
    image = base.load_rgb(path)
    _, protos = forward(variables, _network_input(image, dom.config, config.normalization),
                        (jnp.asarray(embs),), image.shape[:2])
    mask = np.asarray(protos[0])[0].astype(np.uint8)
    color = runtime.colorize(mask, palette)
    stem = os.path.splitext(os.path.basename(path))[0]
    Image.fromarray(mask).save(os.path.join(output, f"{stem}_mask.png"))
    Image.fromarray(color).save(os.path.join(output, f"{stem}_color.png"))
    Image.fromarray((0.5 * image + 0.5 * color).astype(np.uint8)).save(
        os.path.join(output, f"{stem}_overlay.png"))
    written.append(stem)
  plot_legend(dom.reader.spec.classes, palette, os.path.join(output, "legend.png"),
              title=dom.name)
  agreement = prototype_agreement(model, variables, dom, index, embs, k=k,
                                  normalization=config.normalization,
                                  normalize_pixels=bool(config.normalize_pixels),
                                  max_images=max_images, forward=forward)
  agreement["step"] = step
  _write_json(os.path.join(output, "agreement.json"), agreement)
  return {"label_space": dom.name, "step": step, "output": output, "images": len(written),
          "classes": list(dom.reader.spec.classes),
          "agreement": agreement["agreement"],
          "head_miou": agreement["head"]["miou"],
          "prototype_miou": agreement["prototypes"]["miou"]}


def _correspondence_markdown(domain_a: str, domain_b: str, similarity_matches,
                             data_matches, pixels: np.ndarray) -> str:
  lines = [f"# Label correspondence: {domain_a} -> {domain_b}", "",
           f"Prototype cosine: label-embedding similarity (-1..1). Co-occurrence: fraction of "
           f"{domain_a} ground-truth pixels of the class that head `{domain_b}` labels as the "
           "match.", "",
           f"| {domain_a} class | pixels | {domain_b} by prototype cosine | cosine "
           f"| {domain_b} by co-occurrence | fraction |",
           "|---|---:|---|---:|---|---:|"]

  def cell(match):
    if match is None or match["class_b"] is None:
      return "-", "-"
    return match["class_b"], f"{match['score']:.3f}"

  for i, data in enumerate(data_matches):
    sim = similarity_matches[i] if similarity_matches else None
    s_name, s_score = cell(sim)
    d_name, d_score = cell(data)
    lines.append(f"| {data['class_a']} | {int(pixels[i])} | {s_name} | {s_score} | "
                 f"{d_name} | {d_score} |")
  return "\n".join(lines) + "\n"


def correspondence(config: ml_collections.ConfigDict, workdir: str, *, domain_a: str,
                   domain_b: str, output: str | None = None, which: str = "best",
                   max_images: int = 0) -> dict:
  """Class alignment of domain A to domain B: heat maps, Markdown and JSON tables.

  (a) cosine similarity of the label embeddings [C_A, C_B] (skipped, with a note,
  when the run has none); (b) A's ground truth vs head B's argmax on A's
  evaluation images, row-normalised [C_A, C_B].
  """
  model, state, domains, step = restore_state(config, workdir, which)
  ia = _domain_index(domains, domain_a, "domain_a")
  ib = _domain_index(domains, domain_b, "domain_b")
  dom_a, dom_b = domains[ia], domains[ib]
  names_a, names_b = dom_a.reader.spec.classes, dom_b.reader.spec.classes
  output = output or os.path.join(workdir, "visualize", "correspondence")
  os.makedirs(output, exist_ok=True)
  tag = f"{dom_a.name}_{dom_b.name}"
  result: dict[str, Any] = {"domain_a": dom_a.name, "domain_b": dom_b.name, "step": step,
                            "classes_a": list(names_a), "classes_b": list(names_b),
                            "files": {}}

  k = int(config.embeddings_per_class)
  similarity_matches = None
  try:
    emb_a = domain_label_embeddings(config, workdir, state, domains, ia)
    emb_b = domain_label_embeddings(config, workdir, state, domains, ib)
  except ValueError as e:
    result["similarity_note"] = str(e)
  else:
    similarity = prototype_similarity(emb_a, emb_b, k, k)
    similarity_matches = best_matches(similarity, names_a, names_b)
    result["similarity"] = similarity.tolist()
    result["similarity_matches"] = similarity_matches
    result["files"]["similarity_png"] = plot_heatmap(
        similarity, names_a, names_b, os.path.join(output, f"similarity_{tag}.png"),
        title=f"Label-embedding cosine: {dom_a.name} vs {dom_b.name}",
        xlabel=f"{dom_b.name} class", ylabel=f"{dom_a.name} class", vmin=-1.0, vmax=1.0,
        cmap="RdBu_r")

  examples = dom_a.eval_examples[:max_images] if max_images > 0 else dom_a.eval_examples
  if not examples:
    raise ValueError(f"domain {dom_a.name!r} has no evaluation examples "
                     f"(eval_split={dom_a.config.eval_split!r})")
  forward = make_forward(model)
  variables = _variables(state)
  counts = np.zeros((len(names_a), len(names_b)), np.int64)
  for ex in examples:
    item = dom_a.reader.load_example(ex)
    label = item["label"].astype(np.int32)
    heads, _ = forward(variables, _network_input(item["image"], dom_a.config,
                                                 config.normalization), (), label.shape)
    counts += cooccurrence(label, np.asarray(heads[ib])[0], len(names_a), len(names_b))
  pixels = counts.sum(axis=1)
  fractions = row_normalize(counts)
  data_matches = best_matches(fractions, names_a, names_b, valid_rows=pixels > 0)
  result.update(num_images=len(examples), cooccurrence_counts=counts.tolist(),
                cooccurrence=fractions.tolist(), cooccurrence_matches=data_matches,
                pixels_per_class_a=pixels.tolist())
  result["files"]["cooccurrence_png"] = plot_heatmap(
      fractions, names_a, names_b, os.path.join(output, f"cooccurrence_{tag}.png"),
      title=f"{dom_a.name} ground truth vs head {dom_b.name} ({len(examples)} images)",
      xlabel=f"{dom_b.name} head prediction", ylabel=f"{dom_a.name} ground truth",
      vmin=0.0, vmax=1.0)
  md_path = os.path.join(output, f"correspondence_{tag}.md")
  with open(md_path, "w") as f:
    f.write(_correspondence_markdown(dom_a.name, dom_b.name, similarity_matches, data_matches,
                                     pixels))
  result["files"]["markdown"] = md_path
  result["files"]["json"] = os.path.join(output, f"correspondence_{tag}.json")
  _write_json(result["files"]["json"], result)
  return result


def cell_centre_labels(label: np.ndarray, feature_hw: tuple[int, int],
                       stride: int = 8) -> np.ndarray:
  """Labels at the centres of the `stride` x `stride` cells of a feature map.

  Args:
    label: [H, W] class ids.
    feature_hw: (h, w) of the feature map, h = ceil(H / stride).
  Returns:
    [h, w] int32; cells whose centre lies outside the image get the ignore label.
  """
  fh, fw = feature_hw
  padded = np.full((fh * stride, fw * stride), IGNORE_LABEL, np.int32)
  h, w = min(label.shape[0], fh * stride), min(label.shape[1], fw * stride)
  padded[:h, :w] = label[:h, :w]
  half = stride // 2
  return padded[half::stride, half::stride][:fh, :fw]


@functools.lru_cache(maxsize=16)
def _features_fn(model):
  """jitted `(variables, images [B,h,w,3]) -> encoder features [B, h/8, w/8, F]`, per model."""
  return jax.jit(lambda variables, images: model.apply(
      variables, images, train=False, logits=False, features=True)["features"])


def sample_features(model, variables, domains: Sequence[train_lib.Domain], *,
                    normalization: str, per_class: int, max_pixels_per_image: int,
                    seed: int, max_images: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Encoder features of up to `per_class` pixels per class and domain (eval images).

  As the label-embedding stage (`embedding_stage.feature_label_batches`) samples
  them: features at 1/8 resolution, labels at the cell centres, at most
  `max_pixels_per_image` labelled cells per image; then `per_class` per class.
  Returns:
    (features [N, F] float32, domain_ids [N] int32, class_ids [N] int32).
  """
  from usss_jax.data import transforms
  rng = np.random.default_rng(seed)
  features_fn = _features_fn(model)
  feats, doms, classes = [], [], []
  for d, dom in enumerate(domains):
    examples = dom.eval_examples[:max_images] if max_images > 0 else dom.eval_examples
    if not examples:
      raise ValueError(f"domain {dom.name!r} has no evaluation examples "
                       f"(eval_split={dom.config.eval_split!r})")
    eval_resize = tuple(dom.config.get("eval_resize", ()))
    dom_feats, dom_labels = [], []
    for ex in examples:
      item = dom.reader.load_example(ex)
      image, label = item["image"], item["label"]
      if eval_resize:
        image, label = transforms.resize(image, label, eval_resize)
      f = np.asarray(features_fn(variables, transforms.normalize(image, normalization)[None]))[0]
      cells = cell_centre_labels(label, f.shape[:2]).reshape(-1)
      valid = np.flatnonzero(cells != IGNORE_LABEL)
      if len(valid) > max_pixels_per_image:
        valid = np.sort(rng.choice(valid, max_pixels_per_image, replace=False))
      dom_feats.append(f.reshape(-1, f.shape[-1])[valid].astype(np.float32))
      dom_labels.append(cells[valid])
    f, lab = np.concatenate(dom_feats), np.concatenate(dom_labels)
    keep = sample_per_class(lab, per_class, rng)
    feats.append(f[keep])
    classes.append(lab[keep].astype(np.int32))
    doms.append(np.full(len(keep), d, np.int32))
  return np.concatenate(feats), np.concatenate(doms), np.concatenate(classes)


def _load_run_config(workdir: str, fallback: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`), else `fallback`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return fallback
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the run's config ({e})") from e


def tsne(config: ml_collections.ConfigDict, workdir: str, *, output: str | None = None,
         compare_workdir: str | None = None, labels: Sequence[str] = (),
         compare_config: ml_collections.ConfigDict | None = None, which: str = "best",
         per_class: int = 200, max_pixels_per_image: int = 512, perplexity: float = 30.0,
         seed: int = 0, max_images: int = 0) -> dict:
  """t-SNE of encoder features per class and domain; one panel per run.

  The second run (`compare_workdir`) is restored with `compare_config`, else its
  own `config.json`, else `config`. Writes the PNG and an .npz of the points.
  """
  runs = [(workdir, config)]
  if compare_workdir:
    runs.append((compare_workdir,
                 compare_config or _load_run_config(compare_workdir, config)))
  labels = [s for s in labels if s]
  if labels and len(labels) != len(runs):
    raise ValueError(f"--labels names {len(labels)} panels ({labels}) but there are "
                     f"{len(runs)} runs")
  output = output or os.path.join(workdir, "visualize", "tsne.png")
  if not output.lower().endswith(".png"):
    output = os.path.join(output, "tsne.png")
  panels, arrays, info = [], {}, []
  for r, (run_dir, run_config) in enumerate(runs):
    model, state, domains, step = restore_state(run_config, run_dir, which)
    feats, dom_ids, cls_ids = sample_features(
        model, _variables(state), domains, normalization=run_config.normalization,
        per_class=per_class, max_pixels_per_image=max_pixels_per_image, seed=seed,
        max_images=max_images)
    points = tsne_points(feats, seed=seed, perplexity=perplexity)
    # The method the run trained with (a --config.method override is not in the file).
    method = _load_run_config(run_dir, run_config).get("method", run_config.method)
    title = labels[r] if labels else (
        f"{os.path.basename(os.path.normpath(run_dir))} ({method}, step {step})")
    panels.append(TsnePanel(title, points, dom_ids, cls_ids, tuple(d.name for d in domains),
                            tuple(tuple(d.reader.spec.classes) for d in domains)))
    arrays.update({f"points_{r}": points, f"domain_ids_{r}": dom_ids,
                   f"class_ids_{r}": cls_ids})
    info.append({"workdir": os.path.abspath(run_dir), "title": title, "step": step,
                 "method": method, "num_points": int(len(points)),
                 "domains": [d.name for d in domains]})
  plot_tsne(panels, output)
  npz_path = os.path.splitext(output)[0] + ".npz"
  np.savez(npz_path, **arrays)
  return {"output": output, "points": npz_path, "panels": info}


# ---------------------------------------------------------------------------- CLI

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags on `flag_values` (the global FLAGS under `python -m`)."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file (as launch.py).",
                                  flag_values=flag_values, lock_config=True)
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Work directory of a trained run.", **fv)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.", **fv)
  flags.DEFINE_string("output", None, "predict_any/correspondence: output folder; tsne: PNG "
                      "path (default under <workdir>/visualize).", **fv)
  flags.DEFINE_string("input", None, "predict_any: an image file or a folder of images.", **fv)
  flags.DEFINE_string("label_space", None, "predict_any: domain whose classes to predict.",
                      **fv)
  flags.DEFINE_string("domain_a", None, "correspondence: rows (its eval images are used).",
                      **fv)
  flags.DEFINE_string("domain_b", None, "correspondence: columns (its head predicts).", **fv)
  flags.DEFINE_string("compare_workdir", None, "tsne: a second run for a second panel.", **fv)
  flags.DEFINE_list("labels", [], "tsne: panel titles, one per run (e.g. basic,full).", **fv)
  flags.DEFINE_integer("per_class", 200, "tsne: pixels per class and domain.", **fv)
  flags.DEFINE_integer("max_pixels_per_image", 512, "tsne: pixels drawn per image.", **fv)
  flags.DEFINE_float("perplexity", 30.0, "tsne: t-SNE perplexity.", **fv)
  flags.DEFINE_integer("max_images", 0, "Evaluation images per domain (0 = all).", **fv)
  flags.DEFINE_integer("seed", 0, "Sampling and t-SNE seed.", **fv)


def run_command(command: str, flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs one command with parsed flags; returns its JSON-able summary."""
  fv = flag_values
  if command not in COMMANDS:
    raise app.UsageError(f"unknown command {command!r}; expected one of {COMMANDS}")
  if fv.workdir is None:
    raise app.UsageError("--workdir is required")
  config, workdir = fv["config"].value, fv.workdir
  if config is None:
    raise app.UsageError("--config is required")
  if command == "predict_any":
    if not fv.input:
      raise app.UsageError("predict_any needs --input (an image or a folder)")
    return predict_any(config, workdir, fv.input, label_space=fv.label_space,
                       output=fv.output, which=fv.checkpoint, max_images=fv.max_images)
  if command == "correspondence":
    return correspondence(config, workdir, domain_a=fv.domain_a, domain_b=fv.domain_b,
                          output=fv.output, which=fv.checkpoint, max_images=fv.max_images)
  return tsne(config, workdir, output=fv.output, compare_workdir=fv.compare_workdir,
              labels=fv.labels, which=fv.checkpoint, per_class=fv.per_class,
              max_pixels_per_image=fv.max_pixels_per_image, perplexity=fv.perplexity,
              seed=fv.seed, max_images=fv.max_images)


def _is_matrix(value) -> bool:
  return isinstance(value, list) and bool(value) and isinstance(value[0], list)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(f"expected one command ({' | '.join(COMMANDS)}), got {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  result = run_command(argv[1])
  # Matrices are in the written JSON; the terminal gets the summary.
  print(json.dumps({k: v for k, v in result.items() if not _is_matrix(v)}, indent=2,
                   sort_keys=True, default=str))


if __name__ == "__main__":
  define_flags()
  app.run(main)
