"""What each launcher mode does: train, embed, eval, predict; restoring a run's checkpoint."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from usss_jax import checkpoint as ckpt_lib
from usss_jax import config as config_lib
from usss_jax import evaluate, files, inference, sharding, train_step
from usss_jax.data.base import load_rgb
from usss_jax.domains import build_domains
from usss_jax.label_embeddings import stage
from usss_jax.train import run_training


def run_config(workdir: str, fallback: ml_collections.ConfigDict | None = None
               ) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`), else `fallback`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    if fallback is None:
      raise FileNotFoundError(f"{path}: no such file; is {workdir} a run directory?")
    return fallback
  return ml_collections.ConfigDict(files.read_json(path, "run's config"))


def _summary(results: dict, names: Sequence[str]) -> dict:
  out = {"mean_miou": results.get("mean_miou")}
  for n in names:
    if n in results:
      out[n] = {"miou": results[n]["miou"], "iou": results[n]["iou"]}
  return out


def embed_and_train(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict, list]:
  """The label-embedding stage where the method needs it, then (resumed) training.

  Returns:
    (final state, last evaluation results or {}, domains).
  """
  config_lib.validate_config(config)
  domains = build_domains(config, workdir)
  embeddings = None
  if config_lib.loss_spec_from_config(config).uses_label_embeddings:
    embeddings = stage.prepare(config, workdir, domains)
  state, results, _, domains = run_training(config, workdir, domains=domains,
                                            label_embeddings=embeddings)
  return state, results, domains


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if possible) and returns per-domain mIoU of the last evaluation."""
  _, results, domains = embed_and_train(config, workdir)
  return _summary(results, [d.name for d in domains]) if results else {}


def embed(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs only the label-embedding stage; returns where the embeddings went."""
  config_lib.validate_config(config)
  domains = build_domains(config, workdir)
  embs = stage.prepare(config, workdir, domains)
  return {d.name: {"shape": list(e.shape),
                   "file": os.path.join(stage.embeddings_dir(workdir), f"{d.name}.npz")}
          for d, e in zip(domains, embs)}


def restore_state(config: ml_collections.ConfigDict, workdir: str, which: str = "best",
                  placement: NamedSharding | None = None):
  """(model, train state, domains, step) from `workdir`'s best (else latest) or latest checkpoint.

  Args:
    which: "best" (falls back to the latest when no best exists) or "latest".
    placement: where the restored arrays go; default replicated over all devices.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
  config_lib.validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ckpt_lib.CheckpointError(f"{ckpt_dir}: no checkpoint directory; train first "
                                   f"(python launch.py --config=... --workdir={workdir})")
  domains = build_domains(config, workdir)
  num_classes = [d.num_classes for d in domains]
  model = train_step.make_model(config, num_classes)
  tx, _ = train_step.make_optimizer(config)
  placement = placement or sharding.replicated(sharding.make_mesh())
  init_fn = functools.partial(
      train_step.init_state, model, tx, input_hw=domains[0].crop_hw,
      label_embeddings=tuple(train_step.placeholder_embeddings(config, num_classes)),
      teacher=config_lib.loss_spec_from_config(config).uses_teacher_state)
  abstract = sharding.abstract_like(jax.eval_shape(init_fn, train_step.init_rng(0)), placement)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints)
  try:
    best = which == "best" and bool(checkpointer.all_steps(best=True))
    if not best and checkpointer.latest_step() is None:
      raise ckpt_lib.CheckpointError(f"{ckpt_dir}: holds no checkpoint")
    state, _ = checkpointer.restore(abstract, best=best)
  finally:
    checkpointer.close()
  return model, state, domains, int(jax.device_get(state["step"]))


def model_variables(state: dict) -> dict:
  """The {"params", "batch_stats"} of a train state."""
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        which: str = "best") -> dict:
  """Evaluates a checkpoint on every domain's evaluation split; writes eval_<step>.json."""
  model, state, domains, step = restore_state(config, workdir, which)
  results = evaluate.evaluate_domains(model, model_variables(state),
                                      [d for d in domains if d.eval_examples],
                                      batch_size=config.eval_batch,
                                      normalization=config.normalization,
                                      miou_convention=config.miou_convention)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, f"eval_{which}_step{step}.json"), results)
  out = _summary(results, [d.name for d in domains])
  out["step"] = step
  return out


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str, *,
            domain: str | None = None, output: str | None = None, which: str = "best") -> dict:
  """Writes `<name>_mask.png` (class ids), `<name>_color.png` and `<name>_overlay.png`."""
  model, state, domains, step = restore_state(config, workdir, which)
  names = [d.name for d in domains]
  domain = domain or names[0]
  if domain not in names:
    raise ValueError(f"--domain={domain!r}: not one of this config's domains {names}")
  dom = domains[names.index(domain)]
  output = output or os.path.join(workdir, "predictions", domain)
  os.makedirs(output, exist_ok=True)
  local = sharding.to_local_replicated(model_variables(state), sharding.local_mesh())

  @functools.partial(jax.jit, static_argnums=(2,))
  def forward(variables, image, out_hw):
    return jnp.argmax(inference.head_logits(model, variables, image, dom.index, out_hw), -1)

  written = []
  for path in inference.list_images(input_path):
    image = load_rgb(path)
    x = inference.preprocess(image, resize_hw=dom.eval_resize_hw,
                             normalization=config.normalization)[None]
    mask = np.asarray(forward(local, x, image.shape[:2]))[0].astype(np.uint8)
    stem = os.path.splitext(os.path.basename(path))[0]
    inference.save_prediction(output, stem, image, mask, dom.palette)
    written.append(stem)
  return {"domain": domain, "step": step, "output": output, "images": len(written),
          "classes": list(dom.classes)}
