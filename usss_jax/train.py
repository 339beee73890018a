"""The training loop: data, the jitted step, logging, checkpoints, evaluation when due.

`run_training` resumes from the newest readable checkpoint of the work directory, feeds the
step (`usss_jax.train_step`) global batches from the input pipeline and owns every side
effect: metrics.jsonl / TensorBoard, orbax checkpoints (newest N and the best by mean mIoU),
the progress bar. It is handed what it needs: the domains, the label embeddings (the
label-embedding stage makes them) and an evaluator (`evaluate.Evaluator`), so the loop knows
nothing of how either is computed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

from clu import parameter_overview
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from usss_jax import checkpoint as ckpt_lib
from usss_jax import checkpoint_dir as ckpt_dir
from usss_jax import config as config_lib
from usss_jax import files, metric_writers, objectives, sharding, state as state_lib
from usss_jax import train_step
from usss_jax import workdir as workdir_lib
from usss_jax.data import pipeline
from usss_jax.data.base import DataError
from usss_jax.data.strong_augment import StrongAugmentConfig
from usss_jax.domains import LABEL_SPACES_FILE, Domain, save_label_spaces

log = logging.getLogger("usss_jax")

# (train state) -> {"results", "mean_miou", "summary" (metrics.jsonl / TensorBoard), "images"
# (TensorBoard panels), "line" (the console)}; see evaluate.Evaluator.
Evaluator = Callable[[dict], dict]


def run_training(config: ml_collections.ConfigDict, workdir: str, domains: Sequence[Domain], *,
                 label_embeddings: Sequence[np.ndarray] | None = None,
                 embedding_projection=None, evaluator: Evaluator | None = None,
                 log_prefix: str = "") -> tuple[dict, dict]:
  """Trains `domains` (resuming from the newest readable checkpoint in `workdir`).

  Args:
    config: the experiment config.
    workdir: run directory (config.json, checkpoints/, metrics.jsonl, tensorboard/).
    domains: the run's domains, in head order.
    label_embeddings: [C_d * K, D] per domain; required by methods that use them.
    embedding_projection: (kernel, bias) the entropy module starts with (see
      `state.initial_state`), or None.
    evaluator: evaluates every `eval_every` steps and at the end (None: never).
    log_prefix: prefix of console lines (the label-embedding stage's pre-training runs).
  Returns:
    (final state, last evaluation report, {} without an evaluator).
  """
  config_lib.validate_config(config)
  spec = objectives.method_spec(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  _record_run(config, workdir, domains)
  # Opened first so that a bad checkpoint directory fails before any compilation.
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints)
  fixed_embeddings = label_embeddings is not None and not config.label_embeddings.ema_theta
  if label_embeddings is None:
    if spec.uses_label_embeddings:
      raise config_lib.ConfigError(
          f"config.method={config.method!r} needs label embeddings: compute them with "
          "usss_jax.label_embedding_stage.prepare (launch.py does this)")
    label_embeddings = state_lib.placeholder_embeddings(config, [d.num_classes for d in domains])
  num_classes = [d.num_classes for d in domains]
  model = state_lib.make_model(config, num_classes)
  tx, schedule = state_lib.make_optimizer(config)
  mesh = sharding.make_mesh()
  placement = sharding.replicated(mesh)
  train_input = _train_input(config, spec, domains, mesh)
  loop = _Loop(config, workdir, checkpointer, train_input, schedule, evaluator, log_prefix)
  # A resume restores into the state's shapes; only a new run initialises one.
  state, start_step = loop.resume(
      state_lib.abstract_state(config, model, tx, spec, domains[0].crop_hw, num_classes,
                               placement),
      lambda: state_lib.initial_state(config, model, tx, spec, domains[0].crop_hw,
                                      label_embeddings, placement, embedding_projection),
      [(d.name, e) for d, e in zip(domains, label_embeddings)] if fixed_embeddings else [])
  if jax.process_index() == 0 and not log_prefix:
    log.debug("parameters:\n%s", parameter_overview.get_parameter_overview(state["params"]))
  step_fn = train_step.jit_train_step(
      train_step.make_train_step(model, tx, spec, [d.name for d in domains]), mesh)
  try:
    loop.open(start_step)
    loop.catch_up(start_step, state)
    for step in range(start_step + 1, config.total_steps + 1):
      state = loop.run_step(step, step_fn, state)
  finally:
    loop.close()
  return state, loop.results


def _record_run(config: ml_collections.ConfigDict, workdir: str,
                domains: Sequence[Domain]) -> None:
  """config.json and label_spaces.json (what `Segmenter` needs to predict without the data),
  written at every start (process 0); a damaged or missing one is reported."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return
  started_before = os.path.isdir(os.path.join(workdir, "checkpoints"))
  for name in ("config.json", LABEL_SPACES_FILE):
    path = os.path.join(workdir, name)
    try:
      files.read_json(path)
    except FileNotFoundError:
      if started_before:
        log.warning("%s was missing; written again from the config", path)
    except (OSError, ValueError) as e:
      log.warning("%s did not read (%s); written again from the config", path,
                  type(e.__cause__ or e).__name__)
  files.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
  save_label_spaces(workdir, domains)


def _train_input(config: ml_collections.ConfigDict, spec: objectives.MethodSpec,
                 domains: Sequence[Domain], mesh) -> pipeline.TrainInput:
  return pipeline.TrainInput(
      domains, labeled_batch=config_lib.global_batch(config, "labeled_batch"),
      unlabeled_batch=(config_lib.global_batch(config, "unlabeled_batch")
                       if spec.uses_unlabeled else 0),
      seed=config.seed, mesh=mesh, normalization=config.normalization,
      worker_count=config.workers, cache_mb=config.data_cache_mb,
      strong=(StrongAugmentConfig.from_dict(config.strong_augment) if spec.uses_strong_views
              else None),
      skip_bad_images=config.skip_bad_images)


class _Loop:
  """The side effects around the step: data, logs, checkpoints, evaluation, stop requests."""

  def __init__(self, config, workdir: str, checkpointer: ckpt_lib.Checkpointer,
               train_input: pipeline.TrainInput, schedule, evaluator: Evaluator | None,
               log_prefix: str):
    self.config, self.workdir, self.checkpointer = config, workdir, checkpointer
    self.train_input, self.schedule, self.evaluator = train_input, schedule, evaluator
    self.log_prefix = log_prefix
    self.results: dict = {}
    self.pending: list = []
    self.collapsed: set = set()
    self.writer = self.progress = None

  def resume(self, abstract: dict, init: Callable[[], dict],
             embeddings: Sequence[tuple[str, np.ndarray]]) -> tuple[dict, int]:
    """The newest readable checkpoint's state and input position, else (init(), 0).

    `embeddings`: (domain, label embeddings) the run is given, where they stay fixed; a
    checkpoint's that differ are reported (training goes on with the checkpoint's).
    """
    restored = restore_newest_readable(self.checkpointer, abstract, self.log_prefix)
    self.checkpointer.check_best(abstract)
    if restored is None:
      return init(), 0
    state, extra = restored
    step = int(jax.device_get(state["step"]))
    try:
      self.train_input.set_state(extra["data"])
    except ValueError as e:
      raise DataError(
          f"{self.checkpointer.directory}/{step}: {e}\nhint: the split lists in "
          f"{self.workdir}/splits, the seed, batch sizes, crops or augmentation changed since; "
          "undo that change, or train in a new --workdir") from e
    log.info("%sresumed from %s at step %d", self.log_prefix, self.checkpointer.directory, step)
    for (name, given), kept in zip(embeddings, state["label_embeddings"]):
      kept = np.asarray(jax.device_get(kept))
      if not np.array_equal(np.asarray(given, kept.dtype), kept):
        log.warning("%sthe label embeddings of %s differ from those checkpoint %d was trained "
                    "with (max |difference| %.3g); training goes on with the checkpoint's",
                    self.log_prefix, name, step, np.max(np.abs(np.asarray(given) - kept)))
    return state, step

  def open(self, start_step: int) -> None:
    is_main = jax.process_index() == 0
    self.writer = metric_writers.MetricWriter(self.workdir, enabled=is_main,
                                              resume_step=start_step)
    if start_step == 0:
      self.writer.write_hparams(json.loads(self.config.to_json()))
    self.progress = tqdm.tqdm(total=self.config.total_steps, initial=start_step, unit="step",
                              desc=self.log_prefix.strip() or None, disable=not is_main,
                              mininterval=1.0 if sys.stderr.isatty() else 10.0)
    self.last_log = (time.time(), start_step)

  def catch_up(self, start_step: int, state: dict) -> None:
    """At the resume step: evaluates when it was due but not recorded (the run was stopped
    between the checkpoint and the evaluation); a finished run's results are its last
    evaluation record (process 0), or a new evaluation where there is none."""
    c = self.config
    if self.evaluator is None or start_step == 0:
      return
    finished = start_step >= c.total_steps
    unrecorded = (jax.process_index() == 0 and start_step not in self.writer.eval_steps
                  and (finished or start_step % c.eval_every == 0))
    if ckpt_dir.any_process(unrecorded):
      self.evaluate(start_step, state)
    elif finished and self.writer.enabled:
      record = self.writer.eval_record(start_step)
      self.results = {k: v for k, v in record.items() if k not in ("step", "kind")}

  def run_step(self, step: int, step_fn, state: dict) -> dict:
    """Runs training step `step` and what is due after it; raises `Stopped` on a stop request."""
    c = self.config
    state, metrics = step_fn(state, self._next_batch(step))
    workdir_lib.note_training_step()
    self.pending.append((step, metrics))
    is_last = step == c.total_steps
    stop_signal = _stop_agreed(step, c.log_every)
    do_ckpt = step % c.checkpoint_every == 0 or is_last or bool(stop_signal)
    do_eval = self.evaluator is not None and (step % c.eval_every == 0 or is_last)
    if step % c.log_every == 0 or do_ckpt or do_eval:
      self._log(step)
    if do_ckpt:
      self.checkpointer.save(step, state, extra={"data": self.train_input.get_state()})
      log.info("%ssaved checkpoint %s/%d", self.log_prefix, self.checkpointer.directory, step)
    if do_eval:
      self.evaluate(step, state)
    if stop_signal and not is_last:
      raise workdir_lib.Stopped(step, stop_signal)
    return state

  def _next_batch(self, step: int):
    try:
      return next(self.train_input)
    except DataError as e:
      kept = self.checkpointer.latest_step()
      raise DataError(
          f"training step {step}: {e}\nhint: the checkpoints (newest: "
          f"{'none' if kept is None else f'step {kept}'}) are kept; replace the file or set "
          "--config.skip_bad_images=True, then run again to resume") from e

  def _log(self, step: int) -> None:
    host, self.pending = jax.device_get(self.pending), []
    for s, m in host:
      metric_writers.check_finite(s, {k: v for k, v in m.items() if k != "grad_norm"},
                                  kept_step=self.checkpointer.latest_step())
    now, (last_time, last_step) = time.time(), self.last_log
    scalars = {k: float(v) for k, v in host[-1][1].items()}
    scalars["learning_rate"] = float(self.schedule(step))
    if self.config.skip_bad_images:
      scalars["bad_images_skipped"] = self.train_input.bad_images_skipped
    scalars["steps_per_second"] = (step - last_step) / max(now - last_time, 1e-9)
    self.last_log = (now, step)
    self.writer.write_scalars(step, scalars)
    warn_collapse(step, scalars, self.config.collapse_threshold, self.collapsed, self.log_prefix)
    self.progress.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)
    self.progress.update(step - self.progress.n)

  def evaluate(self, step: int, state: dict) -> None:
    """Evaluates, logs the report and keeps the state if it is the best so far."""
    report = self.evaluator(state)
    if self.writer.enabled and step not in self.writer.eval_steps:  # once per step (replays)
      self.writer.write_eval(step, report["summary"])
      self.writer.write_images(step, report["images"])
      self.writer.eval_steps.add(step)
    log.info("%seval step %d: %s", self.log_prefix, step, report["line"])
    self.checkpointer.save_best(step, state, extra={"data": self.train_input.get_state()},
                                metric_value=report["mean_miou"])
    self.results = report["results"]

  def close(self) -> None:
    # The error that ends a run is the one reported: failures of the clean-up behind it (the
    # same full disk, a lost process) are left out.
    failing = sys.exc_info()[1] is not None
    if self.progress is not None:
      self.progress.close()
    for close in (self.checkpointer.wait, self.checkpointer.close,
                  self.writer.close if self.writer is not None else None, self.train_input.close):
      try:
        if close is not None:
          close()
      except Exception:  # pylint: disable=broad-except
        if not failing:
          raise
    if self.train_input.bad_images_skipped:
      log.warning("%sskipped %d unloadable image(s) (skip_bad_images=True): %s", self.log_prefix,
                  self.train_input.bad_images_skipped,
                  ", ".join(self.train_input.bad_images) or "before this resume")


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
_COLLAPSE_WATCH = ("within_entropy/", "cross_domain_entropy/", "diversity/")


def warn_collapse(step: int, scalars: dict, threshold: float, warned: set,
                  log_prefix: str = "") -> None:
  """Warns once per metric when an unsupervised entropy or the diversity falls below threshold."""
  for name, value in scalars.items():
    if name.startswith(_COLLAPSE_WATCH) and value < threshold and name not in warned:
      warned.add(name)
      log.warning("%s%s collapsed to %.3g nats (< %g) at step %d: the term carries almost "
                  "no gradient from here on (alignment=reference does this; see "
                  "config.alignment)", log_prefix, name, value, threshold, step)
