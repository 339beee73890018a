"""The training loop: data, the jitted step, logging, checkpoints, evaluation.

`run_training` resumes from the latest checkpoint of the work directory, feeds the step
(`usss_jax.train_step`) global batches from the input pipeline and owns every side effect:
metrics.jsonl / TensorBoard, orbax checkpoints (newest N and the best by mean mIoU), periodic
evaluation. Label embeddings come in as an argument (`label_embeddings.stage.prepare` makes
them); the loop never calls the label-embedding stage.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

from clu import parameter_overview
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from usss_jax import checkpoint as ckpt_lib
from usss_jax import config as config_lib
from usss_jax import evaluate, files, metric_writers, sharding, train_step
from usss_jax import workdir as workdir_lib
from usss_jax.data import pipeline
from usss_jax.data.base import DataError
from usss_jax.data.strong_augment import StrongAugmentConfig
from usss_jax.domains import Domain, build_domains, save_label_spaces

# Run events (parameters, resume, checkpoints, evaluations); the launcher prints them.
log = logging.getLogger("usss_jax")


def run_training(config: ml_collections.ConfigDict, workdir: str, *,
                 domains: Sequence[Domain] | None = None,
                 label_embeddings: Sequence[np.ndarray] | None = None,
                 run_eval: bool = True, log_prefix: str = ""
                 ) -> tuple[dict, dict, Any, list[Domain]]:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates.

  Args:
    config: the experiment config.
    workdir: run directory (config.json, splits/, checkpoints/, metrics.jsonl, tensorboard/).
    domains: the run's domains (default: built from the config, splits in the workdir).
    label_embeddings: [C_d * K, D] per domain; required by methods that use them.
    run_eval: evaluate every `eval_every` steps and at the end.
    log_prefix: prefix of console lines (the embedding stage's pre-training runs).
  Returns:
    (final state, last evaluation results or {}, model, domains).
  """
  config_lib.validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    files.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

  # Opened first so that a bad checkpoint directory fails before any compilation.
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints)
  domains = list(domains) if domains is not None else build_domains(config, workdir)
  if is_main:  # what the run predicts, for segmenting without the datasets (Segmenter)
    save_label_spaces(workdir, domains)
  names = [d.name for d in domains]
  num_classes = [d.num_classes for d in domains]
  model = train_step.make_model(config, num_classes)
  tx, schedule = train_step.make_optimizer(config)
  spec = config_lib.loss_spec_from_config(config)
  mesh = sharding.make_mesh()

  if label_embeddings is None:
    if spec.uses_label_embeddings:
      raise config_lib.ConfigError(
          f"config.method={config.method!r} needs label embeddings: compute them with "
          "usss_jax.label_embeddings.stage.prepare (launch.py does this)")
    label_embeddings = train_step.placeholder_embeddings(config, num_classes)

  init_fn = functools.partial(train_step.init_state, model, tx, input_hw=domains[0].crop_hw,
                              label_embeddings=tuple(label_embeddings),
                              teacher=spec.uses_teacher_state)
  state = jax.jit(init_fn, out_shardings=sharding.replicated(mesh))(
      train_step.init_rng(config.seed))
  if config.pretrained:
    state = jax.device_put(train_step.load_pretrained_encoder(config, model, state),
                           sharding.replicated(mesh))
  if is_main and not log_prefix:
    log.info("parameters:\n%s", parameter_overview.get_parameter_overview(state["params"]))

  train_input = pipeline.TrainInput(
      domains, labeled_batch=config_lib.global_batch(config, "labeled_batch"),
      unlabeled_batch=(config_lib.global_batch(config, "unlabeled_batch")
                       if spec.uses_unlabeled else 0),
      seed=config.seed, mesh=mesh, normalization=config.normalization,
      worker_count=config.workers, cache_mb=config.data_cache_mb,
      strong=(StrongAugmentConfig.from_dict(config.strong_augment) if spec.uses_consistency
              else None),
      skip_bad_images=config.skip_bad_images)
  start_step = 0
  restored = restore_newest_readable(checkpointer, sharding.abstract_like(state), log_prefix)
  if restored is not None:
    state, extra = restored
    train_input.set_state(extra["data"])
    start_step = int(jax.device_get(state["step"]))
    log.info("%sresumed from %s at step %d", log_prefix, checkpointer.directory, start_step)

  step_fn = train_step.jit_train_step(train_step.make_train_step(model, tx, spec, names), mesh)
  writer = metric_writers.MetricWriter(workdir, enabled=is_main)
  if start_step == 0:
    writer.write_hparams(json.loads(config.to_json()))
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, unit="step",
                       desc=log_prefix.strip() or None, disable=not is_main,
                       mininterval=1.0 if sys.stderr.isatty() else 10.0)
  eval_domains = [d for d in domains if d.eval_examples] if run_eval else []
  results: dict = {}

  def run_eval_now(step):
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    res = evaluate.evaluate_domains(model, variables, eval_domains,
                                    batch_size=config_lib.global_batch(config, "eval_batch"),
                                    normalization=config.normalization,
                                    miou_convention=config.miou_convention)
    writer.write_eval(step, evaluate.summary(res, names))
    if is_main:
      writer.write_images(step, evaluate.prediction_panels(model, variables, eval_domains,
                                                           normalization=config.normalization))
    line = " ".join(f"{n}={res[n]['miou']:.4f}" for n in names if n in res)
    log.info("%seval step %d: mIoU %s mean=%.4f", log_prefix, step, line, res["mean_miou"])
    checkpointer.save_best(step, state, extra={"data": train_input.get_state()},
                           metric_value=res["mean_miou"])
    return res

  pending, collapsed = [], set()
  last_log_time, last_log_step = time.time(), start_step
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      try:
        batch = next(train_input)
      except DataError as e:
        kept = checkpointer.latest_step()
        raise DataError(
            f"training step {step}: {e}\nhint: the checkpoints (newest: "
            f"{'none' if kept is None else f'step {kept}'}) are kept; replace the file or set "
            "--config.skip_bad_images=True, then run again to resume") from e
      state, step_metrics = step_fn(state, batch)
      workdir_lib.note_training_step()
      pending.append((step, step_metrics))
      is_last = step == config.total_steps
      stop_signal = _stop_agreed(step, config.log_every)
      do_ckpt = step % config.checkpoint_every == 0 or is_last or bool(stop_signal)
      do_eval = eval_domains and (step % config.eval_every == 0 or is_last)
      if step % config.log_every == 0 or do_ckpt or do_eval:
        host = jax.device_get(pending)
        pending = []
        for s, m in host:
          metric_writers.check_finite(s, {k: v for k, v in m.items() if k != "grad_norm"},
                                      kept_step=checkpointer.latest_step())
        now = time.time()
        scalars = {k: float(v) for k, v in host[-1][1].items()}
        scalars["learning_rate"] = float(schedule(step))
        if config.skip_bad_images:
          scalars["bad_images_skipped"] = train_input.bad_images_skipped
        scalars["steps_per_second"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        writer.write_scalars(step, scalars)
        warn_collapse(step, scalars, config.collapse_threshold, collapsed, log_prefix)
        progress.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)
        progress.update(step - progress.n)
      if do_ckpt:
        checkpointer.save(step, state, extra={"data": train_input.get_state()})
        log.info("%ssaved checkpoint %s/%d", log_prefix, checkpointer.directory, step)
      if do_eval:
        results = run_eval_now(step)
      if stop_signal and not is_last:
        raise workdir_lib.Stopped(step, stop_signal)
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    train_input.close()
    if train_input.bad_images_skipped:
      log.warning("%sskipped %d unloadable image(s) (skip_bad_images=True): %s", log_prefix,
                  train_input.bad_images_skipped, ", ".join(train_input.bad_images) or
                  "before this resume")
  if run_eval and not results and eval_domains and start_step >= config.total_steps:
    results = run_eval_now(start_step)
  return state, results, model, domains


def restore_newest_readable(checkpointer: ckpt_lib.Checkpointer, target: Any,
                            log_prefix: str = "") -> tuple[Any, dict] | None:
  """(state, extra) of the newest checkpoint that reads, or None when there is none.

  An unreadable one is moved aside (never deleted: `Checkpointer.set_aside`) with a warning
  line saying which and why, and the next older one is tried.
  """
  while (step := checkpointer.latest_step()) is not None:
    try:
      return checkpointer.restore(target, step)
    except ckpt_lib.UnreadableCheckpointError as e:
      moved = checkpointer.set_aside(step)
      log.warning("%sskipped unreadable checkpoint %s/%d (%s); moved it to %s", log_prefix,
                  checkpointer.directory, step, e.reason, moved)
  return None


def _stop_agreed(step: int, every: int) -> str | None:
  """The signal that asked to stop after `step`, agreed by all processes, or None.

  On several processes the flags are combined every `every` steps (a checkpoint save needs
  all of them): a stop then lands on the next log step.
  """
  requested = workdir_lib.stop_requested()
  if jax.process_count() == 1:
    return requested
  if step % every:
    return None
  anyone = multihost_utils.process_allgather(np.int32(requested is not None)).any()
  return (requested or "SIGTERM") if anyone else None


# Unsupervised terms that carry no gradient once they reach ~0 (the reference formulation
# gets there by growing the pixel embedding), and the diversity of the prototype assignment.
_COLLAPSE_WATCH = ("within_entropy/", "cross_entropy/", "diversity/")


def warn_collapse(step: int, scalars: dict, threshold: float, warned: set,
                  log_prefix: str = "") -> None:
  """Warns once per metric when an unsupervised entropy or the diversity falls below threshold."""
  for name, value in scalars.items():
    if name.startswith(_COLLAPSE_WATCH) and value < threshold and name not in warned:
      warned.add(name)
      log.warning("%s%s collapsed to %.3g nats (< %g) at step %d: the term carries almost "
                      "no gradient from here on (alignment=reference does this; see "
                      "config.alignment)", log_prefix, name, value, threshold, step)
