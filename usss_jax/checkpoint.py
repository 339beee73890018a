"""Training-state checkpoints: a small wrapper over Orbax's v0 CheckpointManager.

Layout of a checkpoint directory:

  <dir>/<step>/state/   the state pytree (params, batch_stats, opt_state, step,
                        label embeddings, ...), Orbax StandardSave (OCDBT).
  <dir>/<step>/extra/   one JSON dict (data iterator state, config, metrics, seeds).
  <dir>/best/<step>/    the best checkpoint by `best_metric` (own manager, keeps 1).
  <dir>/unreadable/<step>/  checkpoints that failed to restore, moved aside by `set_aside`
                        (kept for inspection; Orbax neither lists nor deletes them).

Atomicity: Orbax writes `<step>.orbax-checkpoint-tmp-<time>` and renames it to
`<step>` only after writing `commit_success.txt` into it (on object stores
without atomic rename it writes into `<step>` and the marker last); leftover
temporaries are removed by Orbax itself (`cleanup_tmp_directories`).

Damage found when a `Checkpointer` opens the directory is repaired without ever deleting
a checkpoint (`usss_jax.checkpoint_dir`). A best checkpoint replaced by a better one of the
same step (a replay after a fallback) is renamed to `best/.replaced-<step>` until the new one
is committed. A save that fails for want of space is a `CheckpointWriteError`; its
temporary is removed.

Multi-host: call every method on every process with the same arguments. Orbax writes each
process's addressable shards and lets the primary process write metadata and rename; the
repairs above run on process 0 between barriers, and a restore that fails on any process
fails on all. Restoring onto `NamedSharding`s reads only the local shards.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from usss_jax import checkpoint_dir, files

PyTree = Any

log = logging.getLogger("usss_jax")

_MAX_REASON_CHARS = 160
CheckpointError = checkpoint_dir.CheckpointError
_STATE_ITEM, _EXTRA_ITEM = checkpoint_dir.STATE_ITEM, checkpoint_dir.EXTRA_ITEM


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written for want of space (the older ones are intact)."""


class UnreadableCheckpointError(CheckpointError):
  """A committed checkpoint whose files do not read back (truncated, overwritten, missing)."""

  def __init__(self, where: str, error: Exception):
    first_line = (str(error).strip().splitlines() or [""])[0]
    if len(first_line) > _MAX_REASON_CHARS:
      first_line = first_line[:_MAX_REASON_CHARS] + " ..."
    self.reason = f"{type(error).__name__}: {first_line}"
    super().__init__(f"{where}: unreadable checkpoint ({self.reason})")


def _quiet_abandoned_io() -> None:
  """After a failed restore or a save that ran out of space, Orbax's abandoned reads and writes
  print tracebacks when they are collected ("Exception ignored in <coroutine ...>", "Event loop
  is closed", "Task exception was never retrieved"); the failure is already reported in one
  line, so those are dropped. Installed when a Checkpointer opens: a failed save's writer
  threads can report before the save's own exception reaches us."""
  if getattr(sys.unraisablehook, "usss_quiet", False):
    return
  default = sys.unraisablehook

  def hook(unraisable):
    text = f"{unraisable.object!r} {unraisable.exc_value}"
    if not any(m in text for m in ("_read_array", "Encountered error while reading",
                                   "Event loop is closed")):
      default(unraisable)
  hook.usss_quiet = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())


def _keypath_str(key: tuple) -> str:
  return "/".join(str(k) for k in key)


def _shape_of(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _abstract_leaf(leaf: Any) -> Any:
  """Concrete jax.Array -> ShapeDtypeStruct with its sharding; others unchanged.

  NumPy arrays and Python scalars stay concrete so Orbax restores them as such.
  """
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


def _check_tree_matches(checkpoint_tree: PyTree, target: PyTree, where: str) -> None:
  """Raises CheckpointError if keys or shapes of the two trees differ.

  Both trees are flattened with Orbax's own key naming (namedtuple fields and
  tuple indices become strings; empty nodes such as optax.EmptyState drop out),
  which is how the checkpoint metadata stores them. Dtypes may differ: Orbax
  casts to the target dtype.
  """
  stored = ocp.tree.to_flat_dict(checkpoint_tree)
  wanted = ocp.tree.to_flat_dict(target)
  missing = sorted(_keypath_str(k) for k in wanted.keys() - stored.keys())
  unexpected = sorted(_keypath_str(k) for k in stored.keys() - wanted.keys())
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys (in target, not in checkpoint): {', '.join(missing)}")
    if unexpected:
      parts.append(f"unexpected keys (in checkpoint, not in target): {', '.join(unexpected)}")
    raise CheckpointError(f"{where}: tree structure does not match the target; "
                          + "; ".join(parts))
  mismatches = []
  for key in sorted(wanted, key=_keypath_str):
    stored_shape, wanted_shape = _shape_of(stored[key]), _shape_of(wanted[key])
    if stored_shape != wanted_shape:
      mismatches.append(f"shape mismatch at {_keypath_str(key)}: checkpoint "
                        f"{stored_shape} vs target {wanted_shape}")
  if mismatches:
    raise CheckpointError(f"{where}: " + "; ".join(mismatches))


class Checkpointer:
  """Saves/restores (state pytree, extra JSON dict) pairs, keeping the newest and the best.

  Usage:
    ckpt = Checkpointer(workdir + "/checkpoints", max_to_keep=2)
    if ckpt.latest_step() is not None:
      state, extra = ckpt.restore(abstract_state)
    ...
    ckpt.save(step, state, extra={"data_iter": it.get_state(), "config": cfg.to_dict()})
    ckpt.save_best(step, state, extra=..., metric_value=results["mean_miou"])
    ckpt.close()
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2, keep_best: bool = True,
               best_metric: str = "mean_miou", best_mode: str = "max",
               async_save: bool = False, read_only: bool = False):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: local path or any path etils.epath understands (gs://...).
      max_to_keep: how many of the newest regular checkpoints to keep.
      keep_best: whether `save_best` keeps a best checkpoint in <directory>/best.
      best_metric: name of the metric `save_best` ranks by.
      best_mode: "max" (higher is better, e.g. mIoU) or "min" (e.g. a loss).
      async_save: if True, `save` returns once arrays are copied off the
        device and files are written in the background; call `wait()` before
        reading the files and `close()` at the end.
      read_only: for readers of a run (eval, predict, analyses, init_from): nothing is
        created, repaired or deleted, damaged or interrupted steps (perhaps of a training in
        progress) are left alone and skipped, and `save` refuses.
    Raises:
      CheckpointError: `directory` holds things that are not our checkpoints.
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    # Orbax needs absolute paths; "gs://..." and other URLs pass through unchanged.
    directory = str(directory)
    if "://" not in directory:
      directory = os.path.abspath(os.path.expanduser(directory))
    self.directory = epath.Path(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.keep_best = keep_best
    self._aside_dir = self.directory / checkpoint_dir.UNREADABLE_SUBDIR
    if checkpoint_dir.no_space_in_save_thread not in logging.getLogger("absl").filters:
      logging.getLogger("absl").addFilter(checkpoint_dir.no_space_in_save_thread)
    _quiet_abandoned_io()
    self._best_dir = self.directory / checkpoint_dir.BEST_SUBDIR
    self._async_save = async_save
    self.read_only = read_only
    self._skipped = {False: self._prepare(self.directory, allow_best=True)}
    self._manager = self._make_manager(self.directory, max_to_keep, async_save, read_only)
    self._best_manager = None
    self._best_value = None
    if keep_best:
      self._skipped[True] = self._prepare(self._best_dir, allow_best=False, prefix="best-",
                                          metric=best_metric)
      self._open_best()

  def _prepare(self, directory: epath.Path, *, allow_best: bool, prefix: str = "",
               metric: str | None = None) -> set[int]:
    """Repairs `directory` (checkpoint_dir.repair); read-only, returns the steps a reader
    skips instead (interrupted, or a best one whose metric does not read)."""
    if not self.read_only:
      checkpoint_dir.repair(directory, self._aside_dir, allow_best=allow_best, prefix=prefix,
                            metric=metric)
      return set()
    found = checkpoint_dir.scan_directory(directory, allow_best=allow_best, metric=metric)
    return {int(p.name) for kind in ("incomplete", "unmarked", "metric") for p in found[kind]}

  def _open_best(self) -> None:
    if self._best_manager is not None:
      self._best_manager.close()
    self._best_manager = self._make_manager(
        self._best_dir, 1, self._async_save, self.read_only,
        best_fn=lambda metrics: metrics[self.best_metric], best_mode=self.best_mode)
    best_step = self._best_manager.best_step()
    self._best_value = None
    if best_step is not None and best_step not in self._skipped[True]:  # metric checked
      self._best_value = float((self._best_manager.metrics(best_step) or {})[self.best_metric])

  @staticmethod
  def _make_manager(directory: epath.Path, max_to_keep: int, async_save: bool,
                    read_only: bool, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            # Read-only without Orbax's option, which warns at every eval and predict.
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only, create=not read_only,
            keep_checkpoints_without_metrics="best_fn" not in options, **options),
        item_handlers={_STATE_ITEM: ocp.StandardCheckpointHandler(),
                       _EXTRA_ITEM: ocp.JsonCheckpointHandler()})

  @staticmethod
  def _save_args(state: PyTree, extra: Mapping) -> ocp.args.Composite:
    if not isinstance(extra, Mapping):
      raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    return ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardSave(state),
                                 _EXTRA_ITEM: ocp.args.JsonSave(files.to_json(extra, "extra"))})

  def save(self, step: int, state: PyTree, *, extra: Mapping, force: bool = False) -> bool:
    """Saves `state` and `extra` as checkpoint `step`, dropping the oldest beyond max_to_keep.

    Args:
      step: training step; Orbax skips a step <= the latest saved one unless `force`.
      state: pytree of jax.Array / np.ndarray / Python scalars.
      extra: JSON-serialisable dict (NumPy scalars/arrays are converted).
      force: save even where Orbax's policy would skip the step.
    Returns:
      Whether a checkpoint was written (or started, with async_save).
    """
    self._check_writable()
    return self._write(self._manager, step, lambda: self._manager.save(
        int(step), args=self._save_args(state, extra), force=force))

  def _write(self, manager: ocp.CheckpointManager, step: int, save) -> bool:
    """Runs `save`; a failure for want of space becomes a CheckpointWriteError (module doc)."""
    try:
      return bool(save())
    except Exception as e:  # tensorstore, OS and Orbax errors alike  # pylint: disable=broad-except
      reason = files.no_space(e)
      if not reason:
        raise
      directory = epath.Path(manager.directory)
      if jax.process_index() == 0:  # free what the failed save took
        for tmp in directory.glob(f"{int(step)}{checkpoint_dir.TMP_SUFFIX}*"):
          tmp.rmtree()
      kept = self.latest_step()
      raise CheckpointWriteError(
          f"{directory / str(step)}: cannot write the checkpoint ({reason})\nhint: the "
          f"checkpoints written before (newest: {'none' if kept is None else f'step {kept}'}) are "
          "intact; free space on that disk (or raise the file-size limit, ulimit -f) and run "
          "the same command again to resume") from e

  def _check_writable(self) -> None:
    if self.read_only:
      raise CheckpointError(f"{self.directory}: opened read-only; cannot save")

  @property
  def best_value(self) -> float | None:
    """Metric value of the kept best checkpoint, or None if there is none."""
    return self._best_value

  def save_best(self, step: int, state: PyTree, *, extra: Mapping,
                metric_value: float) -> bool:
    """Saves into <dir>/best if `metric_value` beats the kept best; returns whether it did.

    A non-finite metric never counts as better. Without `keep_best` this does
    nothing and returns False.
    """
    self._check_writable()
    if self._best_manager is None:
      return False
    value = float(metric_value)
    if not math.isfinite(value):
      log.warning("Not saving best checkpoint at step %d: %s=%s", step, self.best_metric,
                  value)
      return False
    if self._best_value is not None:
      better = value > self._best_value if self.best_mode == "max" else value < self._best_value
      if not better:
        return False
    # force: the best may come from a step below an older best (after a resume).
    def save():
      return self._best_manager.save(int(step), args=self._save_args(state, extra),
                                     metrics={self.best_metric: value}, force=True)
    if int(step) not in self._best_manager.all_steps():
      saved = self._write(self._best_manager, step, save)
    else:  # a replay beat what the first pass saved at this step: replace it (module doc)
      displaced = self._best_dir / f"{checkpoint_dir.REPLACED_PREFIX}{int(step)}"
      self._best_manager.wait_until_finished()
      checkpoint_dir.sync_processes(f"usss_checkpoint_replace:{displaced}")
      if jax.process_index() == 0:
        (self._best_dir / str(int(step))).rename(displaced)
      checkpoint_dir.sync_processes(f"usss_checkpoint_replaced:{displaced}")
      self._best_manager.reload()
      saved = self._write(self._best_manager, step, save)
      self._best_manager.wait_until_finished()
      checkpoint_dir.sync_processes(f"usss_checkpoint_replacing:{displaced}")
      if jax.process_index() == 0:
        displaced.rmtree()
    if saved:
      self._best_value = value
    return saved

  def check_best(self, target: PyTree) -> None:
    """Restores the best checkpoint into `target` to check its files (they are read only by
    evaluation and prediction otherwise); an unreadable one is moved to unreadable/ with a
    warning, and the next evaluation chooses a new best."""
    if self._best_manager is None or not self._best_manager.all_steps():
      return
    try:
      self.restore(target, best=True)
    except UnreadableCheckpointError as e:
      step = self.all_steps(best=True)[-1]
      moved = self.set_aside(step, best=True)
      log.warning("set aside the unreadable best checkpoint %s (%s); moved it to %s (the next "
                  "evaluation chooses a new best)", self._best_dir / str(step), e.reason, moved)

  def latest_step(self) -> int | None:
    """Newest committed regular checkpoint step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self, *, best: bool = False) -> list[int]:
    """Committed steps, ascending (of the best directory if `best`)."""
    return sorted(set(self._get_manager(best).all_steps()) - self._skipped.get(best, set()))

  def _get_manager(self, best: bool) -> ocp.CheckpointManager:
    if not best:
      return self._manager
    if self._best_manager is None:
      raise CheckpointError(f"{self.directory}: best checkpoints are off (keep_best=False)")
    return self._best_manager

  def restore(self, target: PyTree, step: int | None = None, *,
              best: bool = False) -> tuple[PyTree, dict]:
    """Restores checkpoint `step` (default: latest, or the best if `best`).

    Args:
      target: pytree of the same structure as the saved state: abstract
        (jax.ShapeDtypeStruct with `sharding`) or concrete (jax.Array,
        np.ndarray, Python scalars). jax leaves come back with the target's
        shardings and dtypes; NumPy / Python leaves come back as such.
      step: which step; None for the latest.
      best: restore from <dir>/best instead.
    Returns:
      (state, extra dict).
    Raises:
      CheckpointError: no such checkpoint, or its tree keys/shapes differ from `target`.
      UnreadableCheckpointError: its files do not read back.
    """
    manager = self._get_manager(best)
    manager.wait_until_finished()  # a pending async save of this step must land first
    directory = epath.Path(manager.directory)
    steps = self.all_steps(best=best)
    if step is None:
      if not steps:
        raise CheckpointError(f"{directory}: no committed checkpoint to restore")
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(f"{directory}: no checkpoint for step {step}; have {steps}")
    where = f"{directory / str(step)}"
    abstract = jax.tree.map(_abstract_leaf, target)
    try:
      metadata = manager.item_metadata(step)[_STATE_ITEM]
    except Exception as e:  # corrupt or foreign metadata  # pylint: disable=broad-except
      raise UnreadableCheckpointError(where, e) from e
    if metadata is None:  # its metadata file is gone
      raise UnreadableCheckpointError(where, FileNotFoundError(f"no {_STATE_ITEM} metadata"))
    _check_tree_matches(getattr(metadata, "tree", metadata), abstract, where)
    error = None
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          _STATE_ITEM: ocp.args.StandardRestore(abstract),
          _EXTRA_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # tensorstore, JSON and OS errors alike  # pylint: disable=broad-except
      error = e
    # All processes go on from the same checkpoint.
    if checkpoint_dir.any_process(error is not None):
      raise UnreadableCheckpointError(where, error or RuntimeError(
          "unreadable on another process")) from error
    extra = restored[_EXTRA_ITEM]
    return restored[_STATE_ITEM], dict(extra) if extra is not None else {}

  def set_aside(self, step: int, *, best: bool = False) -> str:
    """Moves checkpoint `step` to <dir>/unreadable/<step>[.N] (the best: best-<step>);
    returns where it went.

    The checkpoint is kept for inspection but leaves the manager's steps, so that later saves
    of steps up to and beyond it work as if it had never been written.
    """
    self._check_writable()
    manager = self._get_manager(best)
    manager.wait_until_finished()
    source = epath.Path(manager.directory) / str(step)
    target = checkpoint_dir.aside_target(self._aside_dir, f"best-{step}" if best else str(step))
    checkpoint_dir.sync_processes(f"usss_checkpoint_aside:{source}")
    if jax.process_index() == 0:
      checkpoint_dir.move_aside(source, target)
    checkpoint_dir.sync_processes(f"usss_checkpoint_moved:{source}")
    if best:
      self._open_best()
    else:
      manager.reload()
    return str(target)

  def wait(self) -> None:
    """Blocks until pending (async) saves are on disk."""
    self._manager.wait_until_finished()
    if self._best_manager is not None:
      self._best_manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.close()
    if self._best_manager is not None:
      self._best_manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
