"""One damaged file at a time, anywhere in a run directory.

The file list is generated from a real run (tiny, with pre-trained label embeddings, finished,
and evaluated once by `--mode=eval`), so a file a new version writes is covered without editing
this test. Files are grouped by kind (step numbers, Orbax's hashed data names and the domain
names abstracted); of each kind the newest step's largest file is truncated to a third,
zeroed, or deleted (one of the three per kind, in turn; all three with USSS_DAMAGE_ALL=1),
in a fresh copy of the run, and the same command resumes. Each case must
end one of three ways, with nothing else on the console (one log record at most):

  recovered   one warning naming the file (or the checkpoint it belongs to); the run ends
              with the uninterrupted run's parameters and mIoU, bit for bit;
  not read    no warning: the resume does not read the file; the same final numbers;
  error       one user error naming the file (or its checkpoint) and the fix;

and in every case no checkpoint that was readable is gone (the damaged one may be moved to
checkpoints/unreadable/). `USSS_DAMAGE_TABLE=path` writes the outcome table (docs/FAULTS.md).
"""

import collections
import logging
import os
import pathlib
import re
import shutil

import pytest

from helpers import TINY_RUN, assert_same_params, tiny_demo_config
from usss_jax import cli, modes

pytestmark = pytest.mark.slow

RUN = dict(TINY_RUN, **{"label_embeddings.source": "pretrain",
                        "label_embeddings.pretrain_steps": 2})
DOMAINS = ("street", "indoor")
DAMAGES = ("truncate", "zero", "delete")


@pytest.fixture(scope="module")
def finished_run(demo_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("damage") / "run"
  config = tiny_demo_config(demo_root, **RUN)
  state, results, _ = modes.embed_and_train(config, str(workdir))
  modes.evaluate_checkpoint(config, str(workdir), "best")  # eval_best_step12.json
  return workdir, state, results


def file_kind(relative: str) -> str:
  """The kind of a run file: checkpoint steps, hashed names and domain names abstracted."""
  parts = []
  for part in relative.split("/"):
    if part.isdigit():
      part = "<step>"
    elif re.fullmatch(r"[0-9a-f]{32}", part):
      part = "<hash>"
    elif part.startswith("events.out.tfevents."):
      part = "events.out.tfevents.*"
    part = re.sub(r"step\d+", "step<step>", part)
    for name in DOMAINS:
      part = part.replace(name, "<domain>")
    parts.append(part)
  return "/".join(parts)


def representatives(workdir: pathlib.Path) -> dict[str, pathlib.Path]:
  """One file per kind: the newest step's (then the largest) file."""
  groups = collections.defaultdict(list)
  for path in workdir.rglob("*"):
    if path.is_file():
      groups[file_kind(str(path.relative_to(workdir)))].append(path)

  def newest_largest(path):
    steps = [int(p) for p in path.relative_to(workdir).parts if p.isdigit()]
    return (steps, path.stat().st_size, str(path))
  return {kind: max(paths, key=newest_largest) for kind, paths in sorted(groups.items())}


def _damage(path: pathlib.Path, how: str) -> None:
  if how == "delete":
    path.unlink()
  else:
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size // 3] if how == "truncate" else b"\0" * size)


def _checkpoint_dirs(workdir: pathlib.Path) -> set[pathlib.Path]:
  """Every committed checkpoint step directory of the run and its pre-training runs."""
  return {p.parent.relative_to(workdir) for p in workdir.rglob("commit_success.txt")
          if p.parent.name.isdigit() and "unreadable" not in p.parts}


def _names(message: str, path: pathlib.Path, workdir: pathlib.Path) -> bool:
  """Whether `message` names `path` or a folder of it below the run's checkpoint folders."""
  named = [path] + [a for a in path.parents
                    if workdir in a.parents and a.name not in ("checkpoints", "best")
                    and a.parent != workdir.parent]
  return any(str(p) in message for p in named)


def test_every_file_of_a_run_damaged_alone(finished_run, demo_root, tmp_path, caplog):
  source, reference_state, reference_results = finished_run
  config = tiny_demo_config(demo_root, **RUN)
  kinds = representatives(source)
  assert len(kinds) > 30, sorted(kinds)  # checkpoints, best, pre-training runs, splits, ...
  rows, failures = [], []
  for index, (kind, original) in enumerate(kinds.items()):
    # One damage per kind, the three in turn; USSS_DAMAGE_ALL=1: all three of every kind.
    damages = DAMAGES if os.environ.get("USSS_DAMAGE_ALL") else [DAMAGES[index % 3]]
    for how in damages:
      workdir = tmp_path / "case"
      shutil.rmtree(workdir, ignore_errors=True)
      shutil.copytree(source, workdir)
      path = workdir / original.relative_to(source)
      readable_before = _checkpoint_dirs(workdir)
      _damage(path, how)
      caplog.clear()
      error = state = None
      with caplog.at_level(logging.WARNING):
        try:
          state, results, _ = modes.embed_and_train(config, str(workdir))
        except cli.USER_ERRORS as e:
          error = e
      records = [r for r in caplog.records if r.levelno >= logging.WARNING]
      problems = []
      if error is not None:
        lines = str(error).strip().splitlines()
        outcome, message = "error", lines[0]
        if len(lines) > 2 or len(records) > 0:
          problems.append(f"more than one error line: {lines} {[r.getMessage() for r in records]}")
        if not _names(str(error), path, workdir) or len(lines) < 2 and "delete" not in lines[0]:
          problems.append(f"the error does not name the file and the fix: {lines}")
      else:
        outcome = "recovered" if records else "not read"
        message = records[0].getMessage() if records else ""
        if len(records) > 1:
          problems.append(f"{len(records)} log records: {[r.getMessage() for r in records]}")
        elif records and not _names(message, path, workdir):
          problems.append(f"the warning does not name the file: {message}")
        try:
          assert_same_params(reference_state, state)
          assert results["mean_miou"] == reference_results["mean_miou"]
        except AssertionError as e:
          problems.append(f"final numbers differ: {str(e)[:200]}")
      lost = [d for d in readable_before - _checkpoint_dirs(workdir)
              if d not in path.relative_to(workdir).parents]
      if lost:
        problems.append(f"readable checkpoints gone: {sorted(map(str, lost))}")
      message = message.replace(str(workdir), "RUN")
      rows.append((kind, how, outcome, message))
      print(f"{kind:60s} {how:8s} {outcome:9s} {message[:150]}")
      if problems:
        failures.append(f"{kind} {how}: " + "; ".join(problems))
  if os.environ.get("USSS_DAMAGE_TABLE"):
    with open(os.environ["USSS_DAMAGE_TABLE"], "w") as f:
      f.write("| file | damage | outcome | message |\n|---|---|---|---|\n")
      for row in rows:
        f.write("| `{}` | {} | {} | {} |\n".format(*row[:3], row[3].replace("|", "\\|")))
  counts = collections.Counter(outcome for _, _, outcome, _ in rows)
  print(f"{len(rows)} cases: {dict(counts)}")
  assert not failures, "\n".join(failures)
