"""The launcher's modes: train (with the label-embedding stage), embed, eval, predict.

`launch.py` / `usss-jax` parse the flags (`usss_jax.launcher`) and call one of these. Each
checks the whole config first (`check_config`), so a bad value stops the run before any data
is read or anything compiled.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.sharding import NamedSharding

from usss_jax import config as config_lib
from usss_jax import evaluate, files, inference, label_embedding_stage, objectives, segmenter
from usss_jax import self_supervised_stage, warm_start_stage
from usss_jax import state as state_lib
from usss_jax import workdir as workdir_lib
from usss_jax.data.base import load_rgb
from usss_jax.domains import build_domains, load_label_spaces
from usss_jax.train import run_training


def check_config(config: ml_collections.ConfigDict, stages: bool = True
                 ) -> objectives.MethodSpec:
  """Every check of the config's values; returns the method.

  `stages=False` for the config of a finished run (eval, predict, analyses): its stages have
  run and handed training their outputs (a warm start's `init_from`, a pretraining's
  `pretrained`), so the checks of what the stages may be asked for do not apply."""
  spec = objectives.method_spec(config)
  config_lib.validate_config(config)
  state_lib.make_model(config, [1 for _ in config.domain_names])
  if stages:
    self_supervised_stage.check_config(config)
    if spec.uses_label_embeddings:
      label_embedding_stage.check_config(config)
  return spec


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """ConfigError when `workdir` (or another folder a command writes into) exists and is not a
  directory (the command would fail creating it)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    what = "work directory" if "workdir" in flag else "folder"
    raise config_lib.ConfigError(f"{flag}={workdir}: exists and is not a directory; choose "
                                 f"another {what}")


def require_run(workdir: str, flag: str = "--workdir") -> None:
  """ConfigError unless `workdir` is a trained run directory (its `checkpoints/`): what eval,
  predict and the analyses check before reading anything."""
  check_workdir(workdir, flag)
  if not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"{flag}={workdir}: no such run directory (train one with "
                                 f"launch.py --config=... --workdir={workdir})")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise config_lib.ConfigError(f"{flag}={workdir}: not a trained run directory (no "
                                 "checkpoints/); train it first, or name the run's workdir")


def embed_and_train(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict, list]:
  """The stages (self-supervised pretraining, warm start, label embeddings) where the config
  asks for them, then (resumed) training.

  Holds the workdir's lock and turns SIGTERM / SIGINT into a checkpoint and `Stopped`
  (`usss_jax.workdir.RunGuard`).

  Returns:
    (final state, last evaluation results or {}, domains).
  """
  spec = check_config(config)
  check_workdir(workdir)
  with workdir_lib.RunGuard(workdir, is_main=jax.process_index() == 0):
    domains = build_domains(config, workdir, needs_unlabeled=spec.uses_unlabeled)
    config = self_supervised_stage.prepare(config, workdir, domains)
    config = warm_start_stage.prepare(config, workdir, domains)
    embeddings = projection = None
    if spec.uses_label_embeddings:
      embeddings = label_embedding_stage.prepare(config, workdir, domains)
      if config.label_embeddings.project_embedding:
        projection = label_embedding_stage.embedding_projection(workdir, domains)
    model = state_lib.make_model(config, [d.num_classes for d in domains])
    evaluator = (evaluate.Evaluator(model, domains, config)
                 if any(d.eval_examples for d in domains) else None)
    state, results = run_training(config, workdir, domains, label_embeddings=embeddings,
                                  embedding_projection=projection, evaluator=evaluator)
  return state, results, domains


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if possible) and returns the last evaluation's summary."""
  _, results, domains = embed_and_train(config, workdir)
  return evaluate.summary(results, [d.name for d in domains]) if results else {}


def embed(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs only the label-embedding stage; returns where the embeddings went."""
  check_config(config)
  check_workdir(workdir)
  with workdir_lib.RunGuard(workdir, is_main=jax.process_index() == 0):
    domains = build_domains(config, workdir)
    embs = label_embedding_stage.prepare(config, workdir, domains)
  out_dir = label_embedding_stage.embeddings_dir(workdir)
  return {d.name: {"shape": list(e.shape), "file": os.path.join(out_dir, f"{d.name}.npz")}
          for d, e in zip(domains, embs)}


def restore_with_domains(config: ml_collections.ConfigDict, workdir: str, which: str = "best",
                         placement: NamedSharding | None = None):
  """(model, train state, domains, step): `state.restore` plus the run's datasets (its split
  lists read, nothing written)."""
  check_config(config, stages=False)
  require_run(workdir)
  domains = build_domains(config, workdir, write_splits=False)
  model, state, step = state_lib.restore(config, workdir, [d.num_classes for d in domains],
                                         domains[0].crop_hw, which=which, placement=placement)
  return model, state, domains, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        which: str = "best") -> dict:
  """Evaluates a checkpoint on every domain's evaluation split.

  Writes <workdir>/eval_<which>_step<N>.json (all results and the step).
  """
  model, state, domains, step = restore_with_domains(config, workdir, which)
  results = evaluate.evaluate_domains(model, state_lib.model_variables(state),
                                      [d for d in domains if d.eval_examples],
                                      batch_size=config_lib.global_batch(config, "eval_batch"),
                                      normalization=config.normalization,
                                      miou_convention=config.miou_convention)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, f"eval_{which}_step{step}.json"),
                     {**results, "step": step})
  return {**evaluate.summary(results, [d.name for d in domains]), "step": step}


PREDICTION_FILES = {
    "_mask.png": "class ids (0 .. classes - 1, 8-bit grey): for programs; looks black in a viewer",
    "_color.png": "the mask in the label space's colours (legend.png)",
    "_overlay.png": "the image blended half and half with the colour mask",
    "legend.png": "each class id and name next to its colour",
}


def predict(config: ml_collections.ConfigDict | None, workdir: str, input_path: str, *,
            domain: str | None = None, output: str | None = None, which: str = "best") -> dict:
  """Writes `<name>_mask.png` (class ids), `<name>_color.png`, `<name>_overlay.png` per image
  and `legend.png` (`PREDICTION_FILES`).

  Runs from the run directory alone (`Segmenter`): the datasets need not be on disk. `config`
  is unused (the run's own config.json is read); it is accepted for the launcher's symmetry.
  The run, the domain and the images are checked before the model is restored, and the output
  folder is made only once the first prediction is ready.
  """
  del config
  require_run(workdir)
  try:
    names = [s.name for s in load_label_spaces(workdir)]
  except FileNotFoundError as e:
    raise config_lib.ConfigError(str(e)) from None
  domain = domain or names[0]
  if domain not in names:
    raise config_lib.ConfigError(f"--domain={domain!r}: not one of this run's domains {names}")
  images = inference.list_images(input_path)
  output = output or os.path.join(workdir, "predictions", domain)
  check_workdir(output, "--output")
  model = segmenter.Segmenter.from_workdir(workdir, which)
  for path in images:
    image = load_rgb(path)
    mask = model.predict(image, domain)
    stem = os.path.splitext(os.path.basename(path))[0]
    inference.save_prediction(output, stem, image, mask, model.palette(domain))
  inference.save_legend(os.path.join(output, "legend.png"), model.classes(domain),
                        model.palette(domain), title=domain)
  return {"domain": domain, "step": model.step, "output": output, "images": len(images),
          "classes": list(model.classes(domain)),
          "files": {f"<image>{k}" if k.startswith("_") else k: v
                    for k, v in PREDICTION_FILES.items()}}
