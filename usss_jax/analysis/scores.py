"""Pure statistics of the analyses: class correspondence between label spaces, sampling, t-SNE."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn import manifold

from usss_jax.data.base import IGNORE_LABEL


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
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or len(x) < 4:
    raise ValueError(f"t-SNE needs [N >= 4, F] features, got shape {x.shape}")
  perplexity = float(min(perplexity, (len(x) - 1) / 3.0))
  return manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed).fit_transform(x)
