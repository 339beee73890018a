"""Dense (per-cell) contrastive loss between two views with a known cell offset.

Each view of an image goes through the encoder ([B, h, w, F], one cell per 8x8 pixels) and a
small projection head (1x1 conv, BN, ReLU, 1x1 conv, L2 normalisation). A cell of view 1 whose
content is also in view 2 (`views.two_views`: cell (i, j) of view 2 shows cell (i + dy, j + dx)
of view 1) has that cell as its positive; every other cell of view 2 in the batch, of the same
image or another, is a negative (InfoNCE, as DenseCL / VADeR, with the correspondence given by
the crop geometry instead of feature matching; `exclude_radius` leaves the positive's near
neighbours in its own image out). The loss is symmetric: view 2's cells query view 1's the
same way.

Everything but `ProjectionHead` is a pure function of arrays.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from usss_jax.models.layers import BatchNorm


class ProjectionHead(nn.Module):
  """[B, h, w, F] encoder features -> [B, h, w, out_dim] unit vectors (per cell).

  Only used for pretraining; fine-tuning starts from the encoder alone (the head would tie the
  features to the contrastive task, as in SimCLR / MoCo v2).
  """
  hidden_dim: int = 128
  out_dim: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.hidden_dim, (1, 1), use_bias=False, name="conv_0")(x)
    x = nn.relu(BatchNorm(name="bn_0")(x, use_running_average=not train))
    x = nn.Conv(self.out_dim, (1, 1), use_bias=True, name="conv_1")(x)
    return l2_normalize(x.astype(jnp.float32))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (eps keeps a zero vector's gradient finite)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def cell_correspondence(cells_hw: tuple[int, int], offsets: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """Where each cell of view 1 lies in view 2 of the same image.

  Args:
    cells_hw: (h, w) cells per view.
    offsets: [B, 2] int (dy, dx): cell (i, j) of view 2 shows cell (i + dy, j + dx) of view 1.
  Returns:
    (targets [B, h * w] int32, valid [B, h * w] bool): for view-1 cell (a, b) (row-major index
    a * w + b), the row-major index (a - dy) * w + (b - dx) of its counterpart in view 2, and
    whether that cell exists. Invalid targets are clipped into range (and must be masked).
  """
  h, w = cells_hw
  offsets = jnp.asarray(offsets, jnp.int32)
  rows = jnp.arange(h, dtype=jnp.int32)[None, :, None] - offsets[:, 0, None, None]
  cols = jnp.arange(w, dtype=jnp.int32)[None, None, :] - offsets[:, 1, None, None]
  valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
  targets = jnp.clip(rows, 0, h - 1) * w + jnp.clip(cols, 0, w - 1)
  batch = offsets.shape[0]
  return targets.reshape(batch, h * w), valid.reshape(batch, h * w)


def info_nce(queries: jax.Array, keys: jax.Array, targets: jax.Array, valid: jax.Array,
             temperature: float, excluded: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """InfoNCE of each valid query against all keys, its target key being the positive.

  Args:
    queries: [N, D] unit vectors.
    keys: [M, D] unit vectors.
    targets: [N] int, index of each query's positive key.
    valid: [N] bool, queries that have a positive (the others do not count).
    temperature: cosine similarities are divided by it.
    excluded: optional [N, M] bool, keys that are not negatives of a query (left out of its
      softmax); a query's own target must not be excluded.
  Returns:
    (loss, accuracy): the mean over valid queries of -log softmax(q . k / t)[target], and the
    fraction of valid queries whose most similar key is their positive (0 when none is valid).
  """
  # float32 at least (bf16 similarities would blur the positives), float64 under x64 tests.
  dtype = jnp.promote_types(queries.dtype, jnp.float32)
  logits = (queries.astype(dtype) @ keys.astype(dtype).T) / temperature   # [N, M]
  if excluded is not None:
    logits = jnp.where(excluded, -jnp.inf, logits)
  positive = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  per_query = jax.nn.logsumexp(logits, axis=1) - positive
  weight = valid.astype(dtype)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  loss = jnp.sum(per_query * weight) / count
  hit = jnp.argmax(logits, axis=1) == targets
  accuracy = jnp.sum(hit * weight) / count
  return loss, jax.lax.stop_gradient(accuracy)


def _flatten_groups(z1s, z2s, offsets_list):
  """Concatenates groups of views into cell lists with batch-global correspondence indices.

  Returns (queries, keys, targets_12, valid_12, targets_21, valid_21, cells) where cells =
  (image, row, col) [N] int of every flattened cell (the same layout in both views).
  """
  queries, keys, targets_12, valid_12, targets_21, valid_21 = [], [], [], [], [], []
  images, rows, cols = [], [], []
  start = image_start = 0
  for z1, z2, offsets in zip(z1s, z2s, offsets_list):
    if z1.shape != z2.shape or z1.ndim != 4:
      raise ValueError(f"views must both be [B, h, w, D], got {z1.shape} and {z2.shape}")
    b, h, w, d = z1.shape
    if tuple(offsets.shape) != (b, 2):
      raise ValueError(f"offsets must be [B, 2] = [{b}, 2], got {tuple(offsets.shape)}")
    base = start + (jnp.arange(b, dtype=jnp.int32) * (h * w))[:, None]
    t12, v12 = cell_correspondence((h, w), offsets)
    t21, v21 = cell_correspondence((h, w), -jnp.asarray(offsets, jnp.int32))
    targets_12.append((t12 + base).reshape(-1))
    valid_12.append(v12.reshape(-1))
    targets_21.append((t21 + base).reshape(-1))
    valid_21.append(v21.reshape(-1))
    queries.append(z1.reshape(b * h * w, d))
    keys.append(z2.reshape(b * h * w, d))
    image, row, col = jnp.meshgrid(jnp.arange(b, dtype=jnp.int32) + image_start,
                                   jnp.arange(h, dtype=jnp.int32),
                                   jnp.arange(w, dtype=jnp.int32), indexing="ij")
    images.append(image.reshape(-1))
    rows.append(row.reshape(-1))
    cols.append(col.reshape(-1))
    start += b * h * w
    image_start += b
  cat = lambda xs: jnp.concatenate(xs, axis=0)  # noqa: E731
  return (cat(queries), cat(keys), cat(targets_12), cat(valid_12), cat(targets_21),
          cat(valid_21), (cat(images), cat(rows), cat(cols)))


def _near_positive(targets: jax.Array, cells, radius: int) -> jax.Array:
  """[N, M] bool: key m is a cell of the positive's image within `radius` (Chebyshev) of the
  positive, and not the positive itself."""
  image, row, col = cells
  t_image, t_row, t_col = image[targets], row[targets], col[targets]
  near = ((t_image[:, None] == image[None, :])
          & (jnp.abs(t_row[:, None] - row[None, :]) <= radius)
          & (jnp.abs(t_col[:, None] - col[None, :]) <= radius))
  return near & (targets[:, None] != jnp.arange(image.shape[0])[None, :])


def dense_contrastive_loss(z1: jax.Array | Sequence[jax.Array],
                           z2: jax.Array | Sequence[jax.Array],
                           offsets: jax.Array | Sequence[jax.Array],
                           temperature: float = 0.2, exclude_radius: int = 0
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric dense InfoNCE between the cells of two views.

  Args:
    z1, z2: [B, h, w, D] unit-norm projections of view 1 and view 2 (or sequences of such
      arrays, one per group of images of one crop size, e.g. per domain; the negatives of a
      cell are then all cells of the other view in every group).
    offsets: [B, 2] int (dy, dx) per image (or one such array per group): cell (i, j) of view 2
      shows cell (i + dy, j + dx) of view 1.
    temperature: of the cosine similarities.
    exclude_radius: 0 = every other cell is a negative; r > 0 = cells of the positive's own
      image within Chebyshev distance r of it are not negatives (they show nearly the same
      content; PixPro counts them as positives), so features may vary smoothly within a region
      instead of telling neighbouring cells apart. r >= max(h, w): negatives come from other
      images only.
  Returns:
    (loss, metrics): loss = mean of the two directions' InfoNCE (view 1 cells querying view 2's,
    and view 2's querying view 1's); metrics "accuracy" (fraction of cells whose most similar
    cell of the other view is their positive, both directions), "positive_similarity" (mean
    cosine of positive pairs) and "overlap" (fraction of cells that have a positive).
  """
  if not isinstance(z1, (list, tuple)):
    z1, z2, offsets = [z1], [z2], [offsets]
  q, k, t12, v12, t21, v21, cells = _flatten_groups(z1, z2, offsets)
  excluded_12 = excluded_21 = None
  if exclude_radius > 0:
    excluded_12 = _near_positive(t12, cells, exclude_radius)
    excluded_21 = _near_positive(t21, cells, exclude_radius)
  loss_12, acc_12 = info_nce(q, k, t12, v12, temperature, excluded_12)
  loss_21, acc_21 = info_nce(k, q, t21, v21, temperature, excluded_21)
  weight = v12.astype(jnp.float32)
  positive_cos = jnp.sum(jnp.sum(q * k[t12], axis=-1) * weight) / jnp.maximum(
      jnp.sum(weight), 1.0)
  metrics = {"accuracy": 0.5 * (acc_12 + acc_21),
             "positive_similarity": jax.lax.stop_gradient(positive_cos),
             "overlap": jnp.mean(weight)}
  return 0.5 * (loss_12 + loss_21), metrics
