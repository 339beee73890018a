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
without atomic rename it writes into `<step>` and the marker last). A step
directory without the marker is an interrupted save: it is deleted when a
`Checkpointer` opens the directory (Orbax would otherwise list it as the latest
step and refuse to save steps up to it); leftover temporaries are removed by
Orbax itself (`cleanup_tmp_directories`).

Multi-host: call every method on every process with the same arguments. Orbax
writes each process's addressable shards and lets the primary process write
metadata and rename; the clean-up above runs on process 0 followed by a
barrier. Restoring onto `NamedSharding`s reads only the local shards.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from usss_jax import files

PyTree = Any

log = logging.getLogger("usss_jax")

_STATE_ITEM = "state"
_EXTRA_ITEM = "extra"
_BEST_SUBDIR = "best"
_UNREADABLE_SUBDIR = "unreadable"
_MAX_REASON_CHARS = 160
# Written by Orbax 0.12 into every finished step directory, on every filesystem.
_COMMIT_MARKER = "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Root-level files Orbax may write next to the step directories.
_ORBAX_ROOT_ENTRIES = ("_ROOT_METADATA", "metadata")


class CheckpointError(ValueError):
  """A checkpoint directory or checkpoint does not fit what was asked of it."""


class UnreadableCheckpointError(CheckpointError):
  """A committed checkpoint whose files do not read back (truncated, overwritten, missing)."""

  def __init__(self, where: str, error: Exception):
    first_line = (str(error).strip().splitlines() or [""])[0]
    if len(first_line) > _MAX_REASON_CHARS:
      first_line = first_line[:_MAX_REASON_CHARS] + " ..."
    self.reason = f"{type(error).__name__}: {first_line}"
    super().__init__(f"{where}: unreadable checkpoint ({self.reason})")


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


def _scan_directory(directory: epath.Path, *, allow_best: bool) -> list[epath.Path]:
  """Validates a checkpoint directory; returns its interrupted step directories.

  Raises CheckpointError when the directory holds anything that is not ours:
  unknown files, or a finished step directory without our two items.
  """
  if not directory.exists():
    return []
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: exists and is not a directory")
  unexpected, interrupted = [], []
  for entry in sorted(directory.iterdir(), key=lambda p: p.name):
    name = entry.name
    if name.startswith(".") or _TMP_SUFFIX in name or name in _ORBAX_ROOT_ENTRIES:
      continue
    if allow_best and name in (_BEST_SUBDIR, _UNREADABLE_SUBDIR) and entry.is_dir():
      continue
    if not (name.isdigit() and entry.is_dir()):
      unexpected.append(name)
      continue
    children = {child.name for child in entry.iterdir()}
    if _COMMIT_MARKER in children:
      lacking = [item for item in (_STATE_ITEM, _EXTRA_ITEM) if item not in children]
      if lacking:
        raise CheckpointError(
            f"{directory}: step directory {name}/ lacks item(s) {lacking}; it was "
            "not written by usss_jax.checkpoint.Checkpointer")
    elif not children or children & {_STEP_METADATA, _STATE_ITEM, _EXTRA_ITEM}:
      interrupted.append(entry)
    else:
      # A numbered folder with foreign content: never delete what is not ours.
      unexpected.append(name)
  if unexpected:
    shown = ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
    raise CheckpointError(
        f"{directory}: not a checkpoint directory of usss_jax.checkpoint: unexpected "
        f"entries {shown} (expected only <step>/ directories, Orbax temporaries"
        f"{', best/ and unreadable/' if allow_best else ''})")
  return interrupted


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _remove_interrupted(directory: epath.Path, *, allow_best: bool) -> None:
  """Validates `directory` on every process; process 0 deletes interrupted steps."""
  interrupted = _scan_directory(directory, allow_best=allow_best)
  # Everyone has finished reading before process 0 deletes, and waits for it after.
  _sync_processes(f"usss_checkpoint_scanned:{directory}")
  if jax.process_index() == 0:
    for step_dir in interrupted:
      log.warning("Removing interrupted checkpoint %s (no %s)", step_dir, _COMMIT_MARKER)
      step_dir.rmtree()
  _sync_processes(f"usss_checkpoint_cleaned:{directory}")


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
        created or deleted, interrupted saves (perhaps a training in progress) are left alone
        and skipped, and `save` refuses.
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
    self.read_only = read_only
    self._interrupted = {False: self._prepare(self.directory, allow_best=True)}
    self._manager = self._make_manager(self.directory, max_to_keep, async_save, read_only)
    self._best_manager = None
    self._best_value = None
    if keep_best:
      best_dir = self.directory / _BEST_SUBDIR
      self._interrupted[True] = self._prepare(best_dir, allow_best=False)
      self._best_manager = self._make_manager(
          best_dir, 1, async_save, read_only,
          best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode)
      best_step = self._best_manager.best_step()
      if best_step is not None:
        metrics = self._best_manager.metrics(best_step) or {}
        if best_metric not in metrics:
          raise CheckpointError(
              f"{best_dir}/{best_step}: best checkpoint has no metric {best_metric!r} "
              f"(has {sorted(metrics)})")
        self._best_value = float(metrics[best_metric])

  def _prepare(self, directory: epath.Path, *, allow_best: bool) -> set[int]:
    """Validates `directory`; removes its interrupted steps, or in read-only mode returns them
    (to be skipped)."""
    if self.read_only:
      return {int(p.name) for p in _scan_directory(directory, allow_best=allow_best)}
    _remove_interrupted(directory, allow_best=allow_best)
    return set()

  @staticmethod
  def _make_manager(directory: epath.Path, max_to_keep: int, async_save: bool,
                    read_only: bool, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            # Read-only: nothing created or cleaned up here, and `save` refuses (orbax's own
            # read_only option would log a warning at every eval and predict).
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
    return bool(self._manager.save(int(step), args=self._save_args(state, extra),
                                   force=force))

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
    saved = self._best_manager.save(int(step), args=self._save_args(state, extra),
                                    metrics={self.best_metric: value}, force=True)
    if saved:
      self._best_value = value
    return bool(saved)

  def latest_step(self) -> int | None:
    """Newest committed regular checkpoint step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self, *, best: bool = False) -> list[int]:
    """Committed steps, ascending (of the best directory if `best`)."""
    return sorted(set(self._get_manager(best).all_steps()) - self._interrupted.get(best, set()))

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
    if metadata is None:
      raise CheckpointError(f"{where}: has no '{_STATE_ITEM}' item")
    _check_tree_matches(getattr(metadata, "tree", metadata), abstract, where)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          _STATE_ITEM: ocp.args.StandardRestore(abstract),
          _EXTRA_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # tensorstore, JSON and OS errors alike  # pylint: disable=broad-except
      raise UnreadableCheckpointError(where, e) from e
    extra = restored[_EXTRA_ITEM]
    return restored[_STATE_ITEM], dict(extra) if extra is not None else {}

  def set_aside(self, step: int) -> str:
    """Moves regular checkpoint `step` to <dir>/unreadable/<step>[.N]; returns where it went.

    The checkpoint is kept for inspection but leaves the manager's steps, so that later saves
    of steps up to and beyond it work as if it had never been written.
    """
    self._manager.wait_until_finished()
    source = self.directory / str(step)
    aside_dir = self.directory / _UNREADABLE_SUBDIR
    target, copies = aside_dir / str(step), 0
    while target.exists():
      copies += 1
      target = aside_dir / f"{step}.{copies}"
    _sync_processes(f"usss_checkpoint_aside:{source}")
    if jax.process_index() == 0:
      aside_dir.mkdir(parents=True, exist_ok=True)
      source.rename(target)
    _sync_processes(f"usss_checkpoint_moved:{source}")
    self._manager.reload()
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
