"""Prototypes tracked during training: an exponential moving average of pixel embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_update_centroids(embeddings: jax.Array, pixel_emb: jax.Array, assign_labels: jax.Array,
                         valid: jax.Array, theta: float | jax.Array, k: int = 1) -> jax.Array:
  """Moves each prototype towards the batch mean of the pixels assigned to it.

  new_row = theta * old_row + (1 - theta) * mean(pixels assigned to the row) for
  rows that received pixels; other rows are unchanged. With K=1 a pixel belongs
  to the row of its label; with K>1 to the Euclidean-nearest of its class's K
  rows. Pure and jit-able (k must be static); gradients do not flow into it.

  Args:
    embeddings: [M, d] class-major prototypes, M = C * k.
    pixel_emb: [N, d] (or [..., d]) pixel embeddings.
    assign_labels: [N] (or [...]) class ids; out-of-range ids (e.g. 255) are skipped.
    valid: [N] (or [...]) bool, pixels that may update.
    theta: momentum in [0, 1]; 1 keeps the old prototypes.
    k: prototypes per class (static).
  Returns:
    [M, d] updated prototypes, dtype of `embeddings`.
  """
  num_rows, dim = embeddings.shape
  if num_rows % k:
    raise ValueError(f"embeddings has {num_rows} rows, not a multiple of k={k}")
  num_classes = num_rows // k
  x = jax.lax.stop_gradient(pixel_emb.reshape(-1, dim).astype(jnp.float32))
  labels = assign_labels.reshape(-1).astype(jnp.int32)
  valid = valid.reshape(-1) & (labels >= 0) & (labels < num_classes)
  old = jax.lax.stop_gradient(embeddings.astype(jnp.float32))
  safe_labels = jnp.where(valid, labels, 0)
  if k == 1:
    rows = safe_labels
  else:
    # argmin_j |x - c_j|^2 = argmin_j |c_j|^2 - 2 x.c_j over the K rows of the pixel's class.
    scores = (jnp.sum(old * old, axis=1)[None, :]
              - 2.0 * jnp.dot(x, old.T, precision=jax.lax.Precision.HIGHEST))  # [N, M]
    own_class = (jnp.arange(num_rows) // k)[None, :] == safe_labels[:, None]
    rows = jnp.argmin(jnp.where(own_class, scores, jnp.inf), axis=1)
  weights = valid.astype(jnp.float32)
  sums = jax.ops.segment_sum(x * weights[:, None], rows, num_segments=num_rows)
  counts = jax.ops.segment_sum(weights, rows, num_segments=num_rows)
  batch_mean = sums / jnp.maximum(counts, 1.0)[:, None]
  theta = jnp.asarray(theta, jnp.float32)
  new = jnp.where(counts[:, None] > 0, theta * old + (1.0 - theta) * batch_mean, old)
  return new.astype(embeddings.dtype)
