"""A checkpoint directory on disk: what it may hold, and repairs of damage to it.

`usss_jax.checkpoint.Checkpointer` calls `repair` on its directory and on `best/` before Orbax
opens them. Nothing is ever deleted that could be a readable checkpoint; each repair is one
warning line naming the path:

- a step directory without `commit_success.txt` whose items are incomplete (a save
  interrupted on an object store, where Orbax writes in place and the marker last) is moved to
  `unreadable/`; Orbax would otherwise list it as the newest step and refuse to save up to it.
  On a local disk Orbax renames a finished temporary, so such a directory there is damage;
- one whose items are all there lost only its marker: it is put back (restoring the
  checkpoint then checks the files);
- an unreadable step metadata file (`_CHECKPOINT_METADATA`, timestamps only) is rewritten;
- a best checkpoint whose metric does not read is moved to `unreadable/best-<step>`;
- `best/.replaced-<step>` (a best checkpoint being replaced by a better one of the same step,
  `Checkpointer.save_best`) is deleted once the new one is committed, else put back.

Multi-host: every process scans, process 0 repairs, between barriers.
"""

from __future__ import annotations

import json
import logging
import math

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from usss_jax import files

log = logging.getLogger("usss_jax")

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
BEST_SUBDIR = "best"
UNREADABLE_SUBDIR = "unreadable"
REPLACED_PREFIX = ".replaced-"
# Written by Orbax 0.12 into every finished step directory, on every filesystem.
COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Root-level files Orbax may write next to the step directories.
_ORBAX_ROOT_ENTRIES = ("_ROOT_METADATA", "metadata")


class CheckpointError(ValueError):
  """A checkpoint directory or checkpoint does not fit what was asked of it."""


def no_space_in_save_thread(record: logging.LogRecord) -> bool:
  """A filter of absl's logger, False for Orbax's traceback of a save thread that ran out of
  space (reported in one line by `Checkpointer._write`)."""
  if "_SignalingThread.run() raised" not in str(record.msg):
    return True
  return not files.no_space(record.exc_info[1] if record.exc_info else None) and \
      not files.no_space(RuntimeError(record.getMessage()))


def sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is True on any process (the same answer on all of them)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def aside_target(aside_dir: epath.Path, name: str) -> epath.Path:
  """`aside_dir/name`, or `name.1`, `name.2`, ... where that is taken."""
  target, copies = aside_dir / name, 0
  while target.exists():
    copies += 1
    target = aside_dir / f"{name}.{copies}"
  return target


def move_aside(source: epath.Path, target: epath.Path) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  source.rename(target)


def _read_step_metadata(step_dir: epath.Path) -> bool:
  """Whether the step's `_CHECKPOINT_METADATA` is there and is a JSON object."""
  try:
    return isinstance(json.loads((step_dir / STEP_METADATA).read_text()), dict)
  except (OSError, ValueError):
    return False


def _read_metric(step_dir: epath.Path, metric: str) -> bool:
  """Whether a best checkpoint's `metrics` item reads and holds a finite `metric`."""
  try:
    value = json.loads((step_dir / "metrics" / "metrics").read_text())[metric]
    return math.isfinite(float(value))
  except (OSError, ValueError, KeyError, TypeError):
    return False


def scan_directory(directory: epath.Path, *, allow_best: bool,
                    metric: str | None = None) -> dict[str, list]:
  """Validates a checkpoint directory; returns what needs repair (module doc), by kind:
  "incomplete" / "unmarked" step directories without the commit marker, "metadata" ones whose
  step metadata does not read, "replaced" best checkpoints displaced by a same-step save,
  "metric" best checkpoints (`metric` given) whose metric does not read.

  Raises CheckpointError when the directory holds anything that is not ours:
  unknown files, or a finished step directory without our two items.
  """
  found = {"incomplete": [], "unmarked": [], "metadata": [], "replaced": [], "metric": []}
  if not directory.exists():
    return found
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: exists and is not a directory")
  unexpected = []
  for entry in sorted(directory.iterdir(), key=lambda p: p.name):
    name = entry.name
    if name.startswith(REPLACED_PREFIX):
      found["replaced"].append(entry)
      continue
    if name.startswith(".") or TMP_SUFFIX in name or name in _ORBAX_ROOT_ENTRIES:
      continue
    if allow_best and name in (BEST_SUBDIR, UNREADABLE_SUBDIR) and entry.is_dir():
      continue
    if not (name.isdigit() and entry.is_dir()):
      unexpected.append(name)
      continue
    children = {child.name for child in entry.iterdir()}
    if COMMIT_MARKER in children:
      lacking = [item for item in (STATE_ITEM, EXTRA_ITEM) if item not in children]
      if lacking:
        raise CheckpointError(
            f"{directory}: step directory {name}/ lacks item(s) {lacking}; it was "
            "not written by usss_jax.checkpoint.Checkpointer")
      if metric is not None and not _read_metric(entry, metric):
        found["metric"].append(entry)
      elif not _read_step_metadata(entry):
        found["metadata"].append(entry)
    elif not children or children & {STEP_METADATA, STATE_ITEM, EXTRA_ITEM}:
      complete = ((entry / STATE_ITEM / "_METADATA").exists()
                  and (entry / EXTRA_ITEM / "metadata").exists())
      found["unmarked" if complete else "incomplete"].append(entry)
    else:
      # A numbered folder with foreign content: never touch what is not ours.
      unexpected.append(name)
  if unexpected:
    shown = ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
    raise CheckpointError(
        f"{directory}: not a checkpoint directory of usss_jax.checkpoint: unexpected "
        f"entries {shown} (expected only <step>/ directories, Orbax temporaries"
        f"{', best/ and unreadable/' if allow_best else ''})")
  return found


def repair(directory: epath.Path, aside_dir: epath.Path, *, allow_best: bool,
            prefix: str = "", metric: str | None = None) -> None:
  """Validates `directory` on every process; process 0 repairs what `scan_directory` found."""
  found = scan_directory(directory, allow_best=allow_best, metric=metric)
  sync_processes(f"usss_checkpoint_scanned:{directory}")
  if jax.process_index() == 0:
    for step_dir in found["incomplete"]:
      moved = aside_target(aside_dir, prefix + step_dir.name)
      move_aside(step_dir, moved)
      log.warning("set aside the interrupted checkpoint %s (no %s, items incomplete): moved "
                  "it to %s", step_dir, COMMIT_MARKER, moved)
    for step_dir in found["metric"]:
      moved = aside_target(aside_dir, prefix + step_dir.name)
      move_aside(step_dir, moved)
      log.warning("set aside the best checkpoint %s: its metric %r does not read; moved it to "
                  "%s (the next evaluation chooses a new best)", step_dir, metric, moved)
    for step_dir in found["unmarked"]:
      (step_dir / COMMIT_MARKER).write_text(f"Checkpoint commit was successful to {step_dir}")
      log.warning("%s had lost its %s; its items are all there, so it was put back (restoring "
                  "the checkpoint checks them)", step_dir, COMMIT_MARKER)
    for step_dir in found["metadata"]:
      stamp = (step_dir / COMMIT_MARKER).stat().mtime
      (step_dir / STEP_METADATA).write_text(json.dumps(
          {"init_timestamp_nsecs": int(stamp * 1e9), "commit_timestamp_nsecs": int(stamp * 1e9)}))
      log.warning("%s/%s was missing or unreadable; rewrote it (it holds only timestamps)",
                  step_dir, STEP_METADATA)
    for displaced in found["replaced"]:
      step_dir = directory / displaced.name[len(REPLACED_PREFIX):]
      if (step_dir / COMMIT_MARKER).exists():
        displaced.rmtree()  # the save that replaced it finished
      else:
        if step_dir.exists():
          step_dir.rmtree()  # an interrupted replacement
        displaced.rename(step_dir)
  sync_processes(f"usss_checkpoint_repaired:{directory}")
