"""What each launcher mode does: train, embed, eval, predict."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from usss_jax import train as train_lib


def _summary(results: dict, names: Sequence[str]) -> dict:
  out = {"mean_miou": results.get("mean_miou")}
  for n in names:
    if n in results:
      out[n] = {"miou": results[n]["miou"], "iou": results[n]["iou"]}
  return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if possible) and returns per-domain mIoU of the last evaluation."""
  _, results, _, domains = train_lib.run_training(config, workdir)
  return _summary(results, [d.name for d in domains]) if results else {}


def embed(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs only the label-embedding stage; returns where the embeddings went."""
  from usss_jax import embedding_stage
  train_lib.validate_config(config)
  domains = train_lib.build_domains(config, workdir)
  embs = train_lib.prepare_label_embeddings(config, workdir, domains)
  return {d.name: {"shape": list(e.shape),
                   "file": os.path.join(embedding_stage.embeddings_dir(workdir), f"{d.name}.npz")}
          for d, e in zip(domains, embs)}


def restore_state(config: ml_collections.ConfigDict, workdir: str, which: str = "best",
                  sharding: NamedSharding | None = None):
  """(model, train state, domains, step) from `workdir`'s best (else latest) or latest checkpoint.

  Args:
    which: "best" (falls back to the latest when no best exists) or "latest".
    sharding: where the restored arrays go; default replicated over all devices.
  """
  from usss_jax import checkpoint as ckpt_lib
  from usss_jax.data import pipeline
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
  train_lib.validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ckpt_lib.CheckpointError(f"{ckpt_dir}: no checkpoint directory; train first "
                                   f"(python launch.py --config=... --workdir={workdir})")
  domains = train_lib.build_domains(config, workdir)
  model = train_lib.make_model(config, [d.num_classes for d in domains])
  tx, _ = train_lib.make_optimizer(config)
  sharding = sharding or NamedSharding(pipeline.make_mesh(), P())
  init_fn = functools.partial(train_lib.init_state, model, tx,
                              input_hw=tuple(domains[0].config.crop),
                              label_embeddings=tuple(
                                  train_lib._placeholder_embeddings(config, domains)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          jax.eval_shape(init_fn, train_lib.init_rng(0)))
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints)
  try:
    best = which == "best" and bool(checkpointer.all_steps(best=True))
    if not best and checkpointer.latest_step() is None:
      raise ckpt_lib.CheckpointError(f"{ckpt_dir}: holds no checkpoint")
    state, _ = checkpointer.restore(abstract, best=best)
  finally:
    checkpointer.close()
  return model, state, domains, int(jax.device_get(state["step"]))


def restore_model(config: ml_collections.ConfigDict, workdir: str, which: str = "best"):
  """(model, variables, domains, step): `restore_state` without the optimiser and embeddings."""
  model, state, domains, step = restore_state(config, workdir, which)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return model, variables, domains, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        which: str = "best") -> dict:
  """Evaluates a checkpoint on every domain's evaluation split; writes eval_<step>.json."""
  from usss_jax import evaluate
  model, variables, domains, step = restore_model(config, workdir, which)
  results = evaluate.evaluate_domains(model, variables, train_lib._eval_domains(domains),
                                      batch_size=config.eval_batch,
                                      normalization=config.normalization,
                                      miou_convention=config.miou_convention)
  if jax.process_index() == 0:
    train_lib._write_json_atomic(os.path.join(workdir, f"eval_{which}_step{step}.json"),
                                 results)
  out = _summary(results, [d.name for d in domains])
  out["step"] = step
  return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")


def _list_images(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such image file or folder")
  files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                 if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise FileNotFoundError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
  return files


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """[H, W] class ids -> [H, W, 3] uint8 colours (ids outside the palette are black)."""
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(palette)] = palette
  return lut[np.clip(mask, 0, 255).astype(np.uint8)]


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str, *,
            domain: str | None = None, output: str | None = None, which: str = "best") -> dict:
  """Writes `<name>_mask.png` (class ids), `<name>_color.png` and `<name>_overlay.png`."""
  from PIL import Image
  from usss_jax import evaluate
  from usss_jax.data import base as data_base, transforms
  model, variables, domains, step = restore_model(config, workdir, which)
  names = [d.name for d in domains]
  domain = domain or names[0]
  if domain not in names:
    raise ValueError(f"--domain={domain!r}: not one of this config's domains {names}")
  index = names.index(domain)
  dom = domains[index]
  palette = dom.reader.spec.palette_array()
  output = output or os.path.join(workdir, "predictions", domain)
  os.makedirs(output, exist_ok=True)
  local = evaluate.to_local_replicated(variables, evaluate.local_mesh())
  eval_resize = tuple(dom.config.get("eval_resize", ()))

  @functools.partial(jax.jit, static_argnums=(2,))
  def forward(variables, image, out_hw):
    return jnp.argmax(evaluate.predict_logits(model, variables, image, index, out_hw), -1)

  written = []
  for path in _list_images(input_path):
    image = data_base.load_rgb(path)
    net_in = evaluate._resize_image(image, eval_resize) if eval_resize else image
    x = transforms.normalize(net_in, config.normalization)[None]
    mask = np.asarray(forward(local, x, image.shape[:2]))[0].astype(np.uint8)
    stem = os.path.splitext(os.path.basename(path))[0]
    color = colorize(mask, palette)
    overlay = (0.5 * image + 0.5 * color).astype(np.uint8)
    Image.fromarray(mask).save(os.path.join(output, f"{stem}_mask.png"))
    Image.fromarray(color).save(os.path.join(output, f"{stem}_color.png"))
    Image.fromarray(overlay).save(os.path.join(output, f"{stem}_overlay.png"))
    written.append(stem)
  return {"domain": domain, "step": step, "output": output, "images": len(written),
          "classes": list(dom.reader.spec.classes)}
