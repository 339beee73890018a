"""The one path from an image to the model's outputs: preprocessing, logits, features, masks.

Evaluation, prediction, the label-embedding stage and the analyses all go through here:

  image [H, W, 3] uint8 -> `preprocess` (optional resize, normalisation)
    -> the model in eval mode -> head logits (resized back to the image) / encoder
    features / pixel embedding -> argmax -> class ids [H, W] -> `colorize`, `save_prediction`.

Inference for domain k is G_k(F(x)): the encoder and head k, nothing else. Through the
prototypes (`prototype_scores`) any domain's label set can be predicted from the pixel
embedding instead.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
import numpy as np
from PIL import Image

from usss_jax import files, losses
from usss_jax.data import transforms
from usss_jax.data.base import IGNORE_LABEL, DataError
from usss_jax.label_embeddings import stats

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")


def preprocess(image: np.ndarray, *, resize_hw: Sequence[int] | None,
               normalization: str) -> np.ndarray:
  """[H, W, 3] uint8 -> [h, w, 3] float32 network input (bilinear resize, normalisation)."""
  return transforms.eval_transform({"image": image}, resize_hw=resize_hw or None,
                                   normalization=normalization)["image"]


def resize_scores(scores: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """[B, h, w, C] -> [B, H, W, C] float32, bilinear (identity when the size already fits)."""
  scores = scores.astype(jnp.float32)
  if scores.shape[1:3] == tuple(out_hw):
    return scores
  return jax.image.resize(scores, (scores.shape[0], *out_hw, scores.shape[-1]), "bilinear")


def head_logits(model, variables, images: jax.Array, head: int,
                out_hw: Sequence[int]) -> jax.Array:
  """Head `head`'s logits [B, H, W, C] at `out_hw` (eval-mode BatchNorm)."""
  logits = model.apply(variables, images, train=False, head=head)["logits"]
  return resize_scores(logits, out_hw)


def prototype_scores(pixel_embedding: jax.Array, label_embeddings: jax.Array, k: int = 1, *,
                     normalize_pixels: bool = False) -> jax.Array:
  """Class scores from a domain's prototypes: [B, H, W, D] x [C*K, D] -> [B, H, W, C].

  The similarity of the entropy loss (`losses.label_similarity`), best of each class's K
  prototypes. With `normalize_pixels` the scores are cosines; the argmax is the same either
  way (a pixel's norm scales all its scores alike).
  """
  if pixel_embedding.ndim != 4:
    raise ValueError(f"pixel_embedding must be [B, H, W, D], got shape {pixel_embedding.shape}")
  dim = pixel_embedding.shape[-1]
  if label_embeddings.ndim != 2 or label_embeddings.shape[1] != dim:
    raise ValueError(f"label_embeddings must be [C*K, {dim}] to match the pixel embedding, "
                     f"got shape {label_embeddings.shape}")
  if k < 1 or label_embeddings.shape[0] % k:
    raise ValueError(f"{label_embeddings.shape[0]} label-embedding rows are not a multiple of "
                     f"k={k} prototypes per class")
  scores = losses.label_similarity(pixel_embedding, label_embeddings,
                                   normalize_pixels=normalize_pixels)
  return losses.reduce_prototypes(scores, k, "max")


@functools.lru_cache(maxsize=16)
def features_fn(model):
  """jitted `(variables, images [B, h, w, 3]) -> encoder features [B, h/8, w/8, F]`, per model."""
  return jax.jit(lambda variables, images: model.apply(
      variables, images, train=False, logits=False, features=True)["features"])


@functools.lru_cache(maxsize=16)
def predictor(model, k: int = 1, normalize_pixels: bool = False):
  """jitted `(variables, images, label_embeddings tuple, out_hw) -> (heads, prototypes)`.

  heads: per domain [B, H, W] int32 head argmax at `out_hw`; prototypes: per entry of
  `label_embeddings` ([C*K, D] each) [B, H, W] int32 prototype argmax (empty when it is
  empty). Scores are resized bilinearly to `out_hw` before the argmax, as in evaluation.
  Cached per (model, k, normalize_pixels), so callers share compilations.
  """
  @functools.partial(jax.jit, static_argnums=(3,))
  def forward(variables, images, label_embeddings, out_hw):
    out = model.apply(variables, images, train=False, head=None, logits=True,
                      embedding=bool(label_embeddings))

    def ids(scores):
      return jnp.argmax(resize_scores(scores, out_hw), axis=-1).astype(jnp.int32)

    heads = tuple(ids(logits) for logits in out["logits"])
    protos = tuple(ids(prototype_scores(out["embedding"], e, k,
                                        normalize_pixels=normalize_pixels))
                   for e in label_embeddings)
    return heads, protos

  return forward


def sampled_features(features_of, variables, image: np.ndarray, label: np.ndarray, *,
                     max_pixels: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Encoder features of at most `max_pixels` labelled cells of one preprocessed image.

  Args:
    features_of: a `features_fn(model)`.
    image: [h, w, 3] float32 network input; label: [h, w] class ids at the same size.
  Returns:
    (features [N, F] float32, labels [N] int32), cells in raster order.
  """
  feats = np.asarray(features_of(variables, image[None]))[0]
  cells = np.asarray(stats.cell_centre_labels(label, feats.shape[:2])).reshape(-1)
  valid = np.flatnonzero(cells != IGNORE_LABEL)
  if len(valid) > max_pixels:
    valid = np.sort(rng.choice(valid, max_pixels, replace=False))
  return feats.reshape(-1, feats.shape[-1])[valid].astype(np.float32), cells[valid]


def list_images(path: str) -> list[str]:
  """An image file, or the images under a folder (recursive, sorted); DataError if none."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such image file or folder")
  found = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                 if f.lower().endswith(IMAGE_SUFFIXES))
  if not found:
    raise DataError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
  return found


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """[H, W] class ids -> [H, W, 3] uint8 colours (ids outside the palette are black)."""
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(palette)] = palette
  return lut[np.clip(mask, 0, 255).astype(np.uint8)]


def _write_png(path: str, array: np.ndarray) -> None:
  with files.atomic_write(path, "wb") as f:
    Image.fromarray(array).save(f, format="PNG")


def save_prediction(output: str, stem: str, image: np.ndarray, mask: np.ndarray,
                    palette: np.ndarray) -> None:
  """Writes `<stem>_mask.png` (class ids: looks black in a viewer), `<stem>_color.png` (the
  palette's colours) and `<stem>_overlay.png` (image and colours half and half) to `output`
  (made if needed)."""
  color = colorize(mask, palette)
  _write_png(os.path.join(output, f"{stem}_mask.png"), mask.astype(np.uint8))
  _write_png(os.path.join(output, f"{stem}_color.png"), color)
  _write_png(os.path.join(output, f"{stem}_overlay.png"),
             (0.5 * image + 0.5 * color).astype(np.uint8))


def save_legend(path: str, class_names: Sequence[str], palette: np.ndarray,
                title: str = "") -> str:
  """Writes the colour key of a label space (each class id and name next to its colour) as a
  PNG; returns the path."""
  fig = Figure(figsize=(3.2, 0.28 * len(class_names) + 0.7), dpi=120)
  FigureCanvasAgg(fig)
  handles = [Patch(facecolor=np.asarray(palette[i], np.float64) / 255.0, edgecolor="0.4",
                   label=f"{i}  {name}") for i, name in enumerate(class_names)]
  fig.legend(handles=handles, loc="center", frameon=False, title=title or None)
  with files.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", bbox_inches="tight")
  return path
