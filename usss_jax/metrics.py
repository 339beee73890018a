"""Segmentation metrics: confusion matrices on device, IoU on the host.

The confusion matrix has one row per ground-truth class and one column per
predicted class plus a last "other" column for predictions outside [0, C) (the
reference's heads can predict their extra ignore channel; such a pixel is a miss
for its ground-truth class and a false positive for nobody). Pixels whose ground
truth is the ignore label never count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from usss_jax.data.base import IGNORE_LABEL


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int, *,
                     num_predicted: int | None = None,
                     ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """Counts (ground truth, prediction) pairs. jit-able.

  Args:
    pred: [...] integer predictions.
    label: [...] integer ground truth, same shape; `ignore_label` pixels are skipped.
    num_classes: C, the ground truth's classes.
    num_predicted: P, the predictions' classes (default C; another label space's head, e.g.
      for the label correspondence between two domains).
    ignore_label: void value of `label`.
  Returns:
    [C, P + 1] int32; column P counts predictions outside [0, P).
  """
  if pred.shape != label.shape:
    raise ValueError(f"pred shape {pred.shape} != label shape {label.shape}")
  num_predicted = num_classes if num_predicted is None else num_predicted
  label = label.astype(jnp.int32).reshape(-1)
  pred = pred.astype(jnp.int32).reshape(-1)
  valid = (label != ignore_label) & (label >= 0) & (label < num_classes)
  pred = jnp.where((pred >= 0) & (pred < num_predicted), pred, num_predicted)
  index = jnp.where(valid, label * (num_predicted + 1) + pred, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32),
                        length=num_classes * (num_predicted + 1))
  return counts.astype(jnp.int32).reshape(num_classes, num_predicted + 1)


# miou_convention -> what a class absent from ground truth and prediction gets.
MIOU_CONVENTIONS = {"standard": "nan", "reference": "zero"}


def iou_from_confusion(confusion, *, absent: str = "nan") -> tuple[np.ndarray, float]:
  """Per-class IoU and its mean, in float64.

  Args:
    confusion: [C, C + 1] (or [C, C]) counts, rows = ground truth.
    absent: what a class missing from both ground truth and prediction gets:
      "nan" (standard: excluded from the mean) or "zero" (the reference's
      iouEval: it counts as IoU 0 and pulls the mean down).
  Returns:
    (iou [C] float64, mean IoU float).
  """
  cm = np.asarray(confusion, dtype=np.float64)
  num_classes = cm.shape[0]
  tp = np.diag(cm[:, :num_classes])
  fn = cm.sum(axis=1) - tp
  fp = cm[:, :num_classes].sum(axis=0) - tp
  union = tp + fp + fn
  if absent == "nan":
    with np.errstate(invalid="ignore", divide="ignore"):
      iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
    miou = float(np.nanmean(iou)) if np.any(union > 0) else float("nan")
  elif absent == "zero":
    iou = tp / (union + 1e-15)
    miou = float(np.mean(iou))
  else:
    raise ValueError(f"absent must be 'nan' or 'zero', got {absent!r}")
  return iou, miou


def pixel_accuracy(confusion) -> float:
  """Fraction of valid ground-truth pixels predicted correctly."""
  cm = np.asarray(confusion, dtype=np.float64)
  total = cm.sum()
  return float(np.trace(cm[:, :cm.shape[0]]) / total) if total > 0 else float("nan")
