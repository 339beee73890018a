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
from usss_jax.domains import build_domains
from usss_jax.train import run_training


def check_config(config: ml_collections.ConfigDict) -> objectives.MethodSpec:
  """Every check of the config's values (each stage's own keys); returns the method."""
  spec = objectives.method_spec(config)
  config_lib.validate_config(config)
  state_lib.make_model(config, [1 for _ in config.domain_names])
  self_supervised_stage.check_config(config)
  if spec.uses_label_embeddings:
    label_embedding_stage.check_config(config)
  return spec


def embed_and_train(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict, list]:
  """The stages (self-supervised pretraining, warm start, label embeddings) where the config
  asks for them, then (resumed) training.

  Holds the workdir's lock and turns SIGTERM / SIGINT into a checkpoint and `Stopped`
  (`usss_jax.workdir.RunGuard`).

  Returns:
    (final state, last evaluation results or {}, domains).
  """
  spec = check_config(config)
  with workdir_lib.RunGuard(workdir, is_main=jax.process_index() == 0):
    domains = build_domains(config, workdir)
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
  with workdir_lib.RunGuard(workdir, is_main=jax.process_index() == 0):
    domains = build_domains(config, workdir)
    embs = label_embedding_stage.prepare(config, workdir, domains)
  out_dir = label_embedding_stage.embeddings_dir(workdir)
  return {d.name: {"shape": list(e.shape), "file": os.path.join(out_dir, f"{d.name}.npz")}
          for d, e in zip(domains, embs)}


def restore_with_domains(config: ml_collections.ConfigDict, workdir: str, which: str = "best",
                         placement: NamedSharding | None = None):
  """(model, train state, domains, step): `state.restore` plus the run's datasets."""
  check_config(config)
  domains = build_domains(config, workdir)
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


def predict(config: ml_collections.ConfigDict | None, workdir: str, input_path: str, *,
            domain: str | None = None, output: str | None = None, which: str = "best") -> dict:
  """Writes `<name>_mask.png` (class ids), `<name>_color.png` and `<name>_overlay.png`.

  Runs from the run directory alone (`Segmenter`): the datasets need not be on disk. `config`
  is unused (the run's own config.json is read); it is accepted for the launcher's symmetry.
  """
  del config
  model = segmenter.Segmenter.from_workdir(workdir, which)
  domain = domain or model.domains[0]
  if domain not in model.domains:
    raise ValueError(f"--domain={domain!r}: not one of this run's domains {list(model.domains)}")
  output = output or os.path.join(workdir, "predictions", domain)
  os.makedirs(output, exist_ok=True)
  written = []
  for path in inference.list_images(input_path):
    image = load_rgb(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    inference.save_prediction(output, stem, image, model.predict(image, domain),
                              model.palette(domain))
    written.append(stem)
  return {"domain": domain, "step": model.step, "output": output, "images": len(written),
          "classes": list(model.classes(domain))}
