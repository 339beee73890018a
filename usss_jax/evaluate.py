"""Evaluation: per-domain confusion matrices at label resolution, mIoU, eval mode.

Each process evaluates its own slice of every evaluation split on its local
devices (batches of same-size images, padded with all-ignore images to a multiple
of the local device count); the per-process confusion matrices are summed across
processes. Inference for domain k is G_k(F(x)) and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from usss_jax import metrics
from usss_jax.data import base as data_base
from usss_jax.data import transforms


@dataclasses.dataclass
class EvalDomain:
  """What evaluating one domain needs."""
  name: str
  index: int                     # head index
  reader: data_base.DatasetReader
  examples: list                 # list[Example] of the evaluation split
  eval_resize: tuple[int, ...] = ()  # (h, w) network input; () = label resolution


def local_mesh(data_axis: str = "data") -> Mesh:
  return Mesh(np.array(jax.local_devices()), (data_axis,))


def to_local_replicated(tree, mesh: Mesh):
  """Copies (replicated) global arrays onto this process's devices."""
  def copy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return jax.device_put(np.asarray(x), NamedSharding(mesh, P()))
  return jax.tree.map(copy, tree)


def _resize_image(image: np.ndarray, hw: Sequence[int]) -> np.ndarray:
  from PIL import Image
  h, w = int(hw[0]), int(hw[1])
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def eval_batches(domain: EvalDomain, *, batch_size: int, normalization: str,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
  """Yields (images f32 [B,h,w,3], labels int32 [B,H,W], keys) of same-size images.

  The batch is padded to `batch_size` with zero images whose labels are all
  ignore, so they do not count. This process takes examples[process_index::count].
  """
  mine = domain.examples[process_index::process_count]
  pending_images, pending_labels, pending_keys = [], [], []

  def flush():
    images = np.stack(pending_images)
    labels = np.stack(pending_labels)
    pad = batch_size - len(images)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.full((pad,) + labels.shape[1:],
                                               data_base.IGNORE_LABEL, labels.dtype)])
    out = (images, labels, list(pending_keys))
    pending_images.clear()
    pending_labels.clear()
    pending_keys.clear()
    return out

  for ex in mine:
    item = domain.reader.load_example(ex)
    image = item["image"]
    if domain.eval_resize:
      image = _resize_image(image, domain.eval_resize)
    image = transforms.normalize(image, normalization)
    label = item["label"].astype(np.int32)
    if pending_images and (pending_images[0].shape != image.shape or
                           pending_labels[0].shape != label.shape):
      yield flush()
    pending_images.append(image)
    pending_labels.append(label)
    pending_keys.append(item["key"])
    if len(pending_images) == batch_size:
      yield flush()
  if pending_images:
    yield flush()


def predict_logits(model, variables, images: jax.Array, domain: int,
                   out_hw: tuple[int, int]) -> jax.Array:
  """Domain `domain`'s logits [B, H, W, C] at `out_hw` (bilinear if the input differs)."""
  logits = model.apply(variables, images, train=False, domain=domain)["logits"]
  if logits.shape[1:3] != tuple(out_hw):
    logits = jax.image.resize(logits.astype(jnp.float32),
                              (logits.shape[0], *out_hw, logits.shape[-1]), "bilinear")
  return logits


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _confusion_step(model, variables, images, domain, num_classes, labels):
  logits = predict_logits(model, variables, images, domain, labels.shape[1:3])
  pred = jnp.argmax(logits, axis=-1)
  return metrics.confusion_matrix(pred, labels, num_classes)


def evaluate_domains(model, variables, domains: Sequence[EvalDomain], *, batch_size: int,
                     normalization: str, miou_convention: str = "standard") -> dict:
  """Per-domain mIoU, per-class IoU and pixel accuracy, plus their mean over domains.

  Args:
    model: the UniversalSegmenter.
    variables: {"params", "batch_stats"} (replicated global or host arrays).
    domains: what to evaluate.
    batch_size: global evaluation batch; this process uses batch_size // process_count
      rounded up to a multiple of its local devices.
    normalization: input normalisation (as in training).
    miou_convention: "standard" (absent classes excluded) or "reference" (count as 0).
  Returns:
    {"mean_miou": float, "<name>": {"miou", "pixel_accuracy", "iou": {class: iou},
    "confusion": [[...]], "num_images"}}.
  """
  mesh = local_mesh()
  n_local = len(mesh.devices.ravel())
  per_process = max(1, batch_size // jax.process_count())
  per_process = -(-per_process // n_local) * n_local
  local_vars = to_local_replicated(variables, mesh)
  data_sharding = NamedSharding(mesh, P("data"))
  results = {}
  for dom in domains:
    num_classes = dom.reader.spec.num_classes
    cm = np.zeros((num_classes, num_classes + 1), np.int64)
    count = 0
    for images, labels, keys in eval_batches(dom, batch_size=per_process,
                                             normalization=normalization,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count()):
      cm += np.asarray(_confusion_step(model, local_vars, jax.device_put(images, data_sharding),
                                       dom.index, num_classes,
                                       jax.device_put(labels, data_sharding)))
      count += len(keys)
    if jax.process_count() > 1:
      cm = np.asarray(multihost_utils.process_allgather(cm)).sum(0)
      count = int(np.asarray(multihost_utils.process_allgather(np.int64(count))).sum())
    absent = "zero" if miou_convention == "reference" else "nan"
    iou, miou = metrics.iou_from_confusion(cm, absent=absent)
    results[dom.name] = {
        "miou": miou,
        "pixel_accuracy": metrics.pixel_accuracy(cm),
        "iou": {c: (None if np.isnan(v) else float(v))
                for c, v in zip(dom.reader.spec.classes, iou)},
        "confusion": cm.tolist(),
        "num_images": count,
    }
  mious = [results[d.name]["miou"] for d in domains]
  results["mean_miou"] = float(np.mean(mious)) if mious else float("nan")
  return results
