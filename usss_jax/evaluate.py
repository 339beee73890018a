"""Evaluation: per-domain confusion matrices at label resolution, mIoU, eval mode.

Each process evaluates its own slice of every evaluation split on its local devices (batches
of same-size images, padded with all-ignore images to a multiple of the local device count);
the per-process confusion matrices are summed across processes. Images go through
`inference.preprocess`; head k's logits are resized back to the label's resolution.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from usss_jax import config as config_lib
from usss_jax import inference, metrics, objectives, sharding
from usss_jax import state as state_lib
from usss_jax.data.base import IGNORE_LABEL
from usss_jax.domains import Domain


def eval_batches(domain: Domain, *, batch_size: int, normalization: str,
                 process_index: int = 0, process_count: int = 1, examples=None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
  """Yields (images f32 [B,h,w,3], labels int32 [B,H,W], keys) of same-size images.

  The batch is padded to `batch_size` with zero images whose labels are all
  ignore, so they do not count. This process takes examples[process_index::count] of
  `examples` (default: the domain's evaluation examples).
  """
  examples = domain.eval_examples if examples is None else examples
  mine = examples[process_index::process_count]
  pending_images, pending_labels, pending_keys = [], [], []

  def flush():
    images = np.stack(pending_images)
    labels = np.stack(pending_labels)
    pad = batch_size - len(images)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.full((pad,) + labels.shape[1:], IGNORE_LABEL,
                                               labels.dtype)])
    out = (images, labels, list(pending_keys))
    pending_images.clear()
    pending_labels.clear()
    pending_keys.clear()
    return out

  for ex in mine:
    item = domain.reader.load_example(ex)
    image = inference.preprocess(item["image"], resize_hw=domain.eval_resize_hw,
                                 normalization=normalization)
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


@functools.partial(jax.jit, static_argnames=("model", "head", "num_classes"))
def _confusion_step(model, variables, images, labels, real, *, head, num_classes):
  del real  # padding images have all-ignore labels
  logits = inference.head_logits(model, variables, images, head, labels.shape[1:3])
  return (metrics.confusion_matrix(jnp.argmax(logits, axis=-1), labels, num_classes),)


def sum_over_split(count, variables, domain: Domain, *, batch_size: int, normalization: str,
                   examples=None) -> tuple[tuple[np.ndarray, ...], int]:
  """Sums integer counts over a domain's evaluation split (the batched evaluation loop).

  Each process takes its slice of the split, in batches of same-size images split over its
  local devices (padded with all-ignore images), and the sums are added over processes.

  Args:
    count: jitted `(variables, images [B, h, w, 3], labels [B, H, W], real [B] bool (not
      padding)) -> tuple of integer arrays`.
    variables: what `count` gets (placed on this process's devices,
      `sharding.to_local_replicated`).
    domain: whose examples (its reader and evaluation resize).
    batch_size: global batch; this process uses batch_size // process_count rounded up to a
      multiple of its local devices.
    examples: which examples (default: the domain's evaluation examples).
  Returns:
    (the summed arrays as int64, number of images).
  """
  mesh = sharding.local_mesh()
  n_local = mesh.devices.size
  per_process = max(1, batch_size // jax.process_count())
  per_process = -(-per_process // n_local) * n_local
  data_sharding = sharding.batch_sharded(mesh)
  totals, num_images = None, 0
  for images, labels, keys in eval_batches(domain, batch_size=per_process,
                                           normalization=normalization, examples=examples,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count()):
    real = np.arange(len(images)) < len(keys)
    out = count(variables, *(jax.device_put(x, data_sharding) for x in (images, labels, real)))
    out = tuple(np.asarray(o, np.int64) for o in out)
    totals = out if totals is None else tuple(a + b for a, b in zip(totals, out))
    num_images += len(keys)
  if totals is None:
    raise ValueError(f"domain {domain.name!r} has no evaluation examples")
  if jax.process_count() > 1:
    totals = tuple(np.asarray(multihost_utils.process_allgather(t)).sum(0) for t in totals)
    num_images = int(np.asarray(multihost_utils.process_allgather(np.int64(num_images))).sum())
  return totals, num_images


def class_summary(confusion: np.ndarray, classes: Sequence[str],
                  miou_convention: str = "standard") -> dict:
  """{"miou", "pixel_accuracy", "iou": {class: IoU, None where absent}} of a [C, C + 1]
  confusion matrix."""
  iou, miou = metrics.iou_from_confusion(confusion,
                                         absent=metrics.MIOU_CONVENTIONS[miou_convention])
  return {"miou": miou, "pixel_accuracy": metrics.pixel_accuracy(confusion),
          "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou)}}


def evaluate_domains(model, variables, domains: Sequence[Domain], *, batch_size: int,
                     normalization: str, miou_convention: str = "standard") -> dict:
  """Per-domain mIoU, per-class IoU and pixel accuracy, plus their mean over domains.

  Args:
    model: the UniversalSegmenter.
    variables: {"params", "batch_stats"} (replicated global or host arrays).
    domains: what to evaluate (each with its head `index` and `eval_examples`).
    batch_size: global evaluation batch; this process uses batch_size // process_count
      rounded up to a multiple of its local devices.
    normalization: input normalisation (as in training).
    miou_convention: "standard" (absent classes excluded) or "reference" (count as 0).
  Returns:
    {"mean_miou": float, "<name>": {"miou", "pixel_accuracy", "iou": {class: iou},
    "confusion": [[...]], "num_images"}}.
  """
  local_vars = sharding.to_local_replicated(variables, sharding.local_mesh())
  results = {}
  for dom in domains:
    (cm,), count = sum_over_split(
        functools.partial(_confusion_step, model, head=dom.index, num_classes=dom.num_classes),
        local_vars, dom, batch_size=batch_size, normalization=normalization)
    results[dom.name] = {**class_summary(cm, dom.classes, miou_convention),
                         "confusion": cm.tolist(), "num_images": count}
  mious = [results[d.name]["miou"] for d in domains]
  results["mean_miou"] = float(np.mean(mious)) if mious else float("nan")
  return results


def summary(results: dict, names: Sequence[str]) -> dict:
  """The one summary of an evaluation (metrics.jsonl, TensorBoard, the CLIs, the ablation):
  {"mean_miou", <name>: {"miou", "pixel_accuracy", "iou": {class: IoU or None (absent)},
  "num_images"}}."""
  out = {"mean_miou": results["mean_miou"]}
  for n in names:
    if n in results:
      out[n] = {key: results[n][key] for key in ("miou", "pixel_accuracy", "iou", "num_images")}
  return out


class Evaluator:
  """What the training loop calls at evaluation steps: mIoU of every domain with evaluation
  examples, the TensorBoard prediction panels, and the console line. A state with a teacher
  (consistency's EMA or frozen teacher) has the teacher evaluated too ("teacher" in the
  summary and the results), and one with a peer (Cross Pseudo Supervision) the peer ("peer").

  Returns {"results": `evaluate_domains`, "summary": `summary`, "mean_miou" (the model's),
  "images", "line"}.
  """

  def __init__(self, model, domains: Sequence[Domain], config):
    self.model, self.config = model, config
    self.names = [d.name for d in domains]
    self.domains = [d for d in domains if d.eval_examples]

  def _evaluate(self, variables: dict) -> dict:
    c = self.config
    return evaluate_domains(self.model, variables, self.domains,
                            batch_size=config_lib.global_batch(c, "eval_batch"),
                            normalization=c.normalization, miou_convention=c.miou_convention)

  def __call__(self, state: dict) -> dict:
    variables = state_lib.model_variables(state)
    results = self._evaluate(variables)
    report = summary(results, self.names)
    line = " ".join(f"{n}={results[n]['miou']:.4f}" for n in self.names if n in results)
    line = f"mIoU {line} mean={results['mean_miou']:.4f}"
    for other in ("teacher", objectives.PEER):
      if other in state:
        evaluated = self._evaluate(state_lib.model_variables(state[other]))
        results[other] = evaluated
        report[other] = summary(evaluated, self.names)
        line += f" ({other} mean={evaluated['mean_miou']:.4f})"
    images = (prediction_panels(self.model, variables, self.domains,
                                normalization=self.config.normalization)
              if jax.process_index() == 0 else {})
    return {"results": results, "summary": report, "mean_miou": results["mean_miou"],
            "images": images, "line": line}


def prediction_panels(model, variables, domains: Sequence[Domain], *, normalization: str,
                      num_images: int = 3) -> dict[str, np.ndarray]:
  """TensorBoard images of the first evaluation images: image | prediction | ground truth.

  Returns:
    {"eval/<domain>/prediction": [N, H, 3 * W, 3] uint8} (colours of the domain's palette;
    ignore pixels of the ground truth black).
  """
  variables = sharding.to_local_replicated(variables, sharding.single_device_mesh())
  panels = {}
  for dom in domains:
    rows = []
    for ex in dom.eval_examples[:num_images]:
      item = dom.reader.load_example(ex)
      x = inference.preprocess(item["image"], resize_hw=dom.eval_resize_hw,
                               normalization=normalization)[None]
      pred = np.asarray(_argmax_step(model, variables, x, dom.index, item["label"].shape))[0]
      rows.append(np.concatenate([item["image"], inference.colorize(pred, dom.palette),
                                  inference.colorize(item["label"], dom.palette)], axis=1))
    if rows and len({r.shape for r in rows}) == 1:
      panels[f"eval/{dom.name}/prediction"] = np.stack(rows)
  return panels


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _argmax_step(model, variables, images, head, out_hw):
  return jnp.argmax(inference.head_logits(model, variables, images, head, out_hw), axis=-1)
