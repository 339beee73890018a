"""Seeded labeled/unlabeled splits of a training set, persisted as key lists.

The reference took the first N paths of an unsorted `glob` (filesystem-order
dependent, no seed). Here the labeled subset is a seeded permutation of the
*key-sorted* examples, so it depends only on (keys, num_labeled, seed), and the
chosen keys are written to the work directory so that resumed or repeated runs
read back exactly the same lists.

`<domain>.json` beside the two lists records their key counts and SHA-256 digests (written
last). A list that is missing or does not read as a list of the dataset's keys (truncated,
zeroed) is drawn again from the seed and rewritten when the result matches the record (one
warning); otherwise the run stops naming the file and the fix. A list that reads but differs
from the record (edited by hand, or cut at a line end) is an error until the record is deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Sequence

import numpy as np

from usss_jax import files
from usss_jax.data.base import DataError, Example

log = logging.getLogger("usss_jax")


@dataclasses.dataclass
class Split:
  """Labeled and unlabeled examples of one domain (both sorted by key)."""
  labeled: list[Example]
  unlabeled: list[Example]


def _sorted_unique(examples: Sequence[Example]) -> list[Example]:
  by_key = sorted(examples, key=lambda ex: ex.key)
  for prev, cur in zip(by_key, by_key[1:]):
    if prev.key == cur.key:
      raise DataError(f"duplicate example key {cur.key!r} ({prev.image_path} and "
                      f"{cur.image_path})")
  return by_key


def make_split(examples: Sequence[Example], num_labeled: int, seed: int, *,
               unlabeled_includes_labeled: bool = False,
               labeled_keys: Sequence[str] | None = None) -> Split:
  """Chooses the labeled subset.

  Args:
    examples: the domain's training examples, in any order.
    num_labeled: size of the labeled subset; <= 0 or >= len(examples) = all.
    seed: permutation seed (ignored when `labeled_keys` is given).
    unlabeled_includes_labeled: unlabeled = every example (the reference used
      the full train split as unlabeled data) instead of the complement.
    labeled_keys: explicit labeled keys; each must be an example key.
  Returns:
    Split with both lists sorted by key.
  """
  ordered = _sorted_unique(examples)
  if labeled_keys is not None:
    index = {ex.key: i for i, ex in enumerate(ordered)}
    chosen = set()
    for key in labeled_keys:
      if key not in index:
        raise DataError(f"labeled key {key!r} is not among the {len(ordered)} examples")
      chosen.add(index[key])
  elif num_labeled <= 0 or num_labeled >= len(ordered):
    chosen = set(range(len(ordered)))
  else:
    perm = np.random.default_rng(seed).permutation(len(ordered))
    chosen = set(perm[:num_labeled].tolist())
  labeled = [ex for i, ex in enumerate(ordered) if i in chosen]
  if unlabeled_includes_labeled:
    unlabeled = list(ordered)
  else:
    unlabeled = [ex for i, ex in enumerate(ordered) if i not in chosen]
  return Split(labeled=labeled, unlabeled=unlabeled)


# The validation hold-out must be the same for every run (method, seed) of an experiment, so it
# has its own fixed seed rather than the run's.
HOLDOUT_SEED = 20191027


def hold_out(examples: Sequence[Example], count: int) -> tuple[list[Example], list[Example]]:
  """(held out, rest): `count` examples set aside as validation data, by a fixed seed.

  The choice depends only on the example keys and `count`; both lists are sorted by key.
  """
  ordered = _sorted_unique(examples)
  if not 0 < count < len(ordered):
    raise DataError(f"cannot hold out {count} of {len(ordered)} examples")
  chosen = set(np.random.default_rng(HOLDOUT_SEED).permutation(len(ordered))[:count].tolist())
  return ([ex for i, ex in enumerate(ordered) if i in chosen],
          [ex for i, ex in enumerate(ordered) if i not in chosen])


def _write_lines(path: str, lines: Sequence[str]) -> None:
  files.write_text(path, "".join(line + "\n" for line in lines))


def split_paths(directory: str, domain: str) -> tuple[str, str]:
  """(labeled list path, unlabeled list path) for `domain` in `directory`."""
  return (os.path.join(directory, f"{domain}.labeled.txt"),
          os.path.join(directory, f"{domain}.unlabeled.txt"))


def write_split(split: Split, directory: str, domain: str) -> tuple[str, str]:
  """Writes `<domain>.labeled.txt` and `<domain>.unlabeled.txt` (one key per line)."""
  os.makedirs(directory, exist_ok=True)
  lab_path, unl_path = split_paths(directory, domain)
  _write_lines(lab_path, [ex.key for ex in split.labeled])
  _write_lines(unl_path, [ex.key for ex in split.unlabeled])
  return lab_path, unl_path


def read_keys(path: str) -> list[str]:
  """Keys of a split list file (blank lines skipped); DataError if unreadable."""
  try:
    with open(path) as f:
      keys = [line.strip() for line in f]
  except OSError as e:
    raise DataError(f"{path}: cannot read split list ({e})") from e
  keys = [k for k in keys if k]
  if len(set(keys)) != len(keys):
    raise DataError(f"{path}: split list contains duplicate keys")
  return keys


def _select(examples_by_key: dict[str, Example], keys: Sequence[str], path: str) -> list[Example]:
  missing = [k for k in keys if k not in examples_by_key]
  if missing:
    raise DataError(f"{path}: {len(missing)} listed keys are not in the dataset, "
                    f"e.g. {missing[:5]}")
  return sorted((examples_by_key[k] for k in keys), key=lambda ex: ex.key)


def _text(keys: Sequence[str]) -> str:
  return "".join(k + "\n" for k in keys)


def _record(keys: Sequence[str]) -> dict:
  return {"count": len(keys), "sha256": hashlib.sha256(_text(keys).encode()).hexdigest()}


def _read_record(path: str) -> dict | None:
  """The recorded split of a domain, or None if the record is missing or does not read."""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    return record if all(isinstance(record.get(k), dict) for k in ("labeled", "unlabeled")) \
        else None
  except (OSError, ValueError):
    return None


def _check_keys(keys: list[str], by_key: dict, path: str) -> list[Example]:
  if len(set(keys)) != len(keys):
    raise DataError(f"{path}: split list contains duplicate keys")
  return _select(by_key, keys, path)


def load_or_make_split(examples: Sequence[Example], directory: str, domain: str,
                       num_labeled: int, seed: int, *,
                       unlabeled_includes_labeled: bool = False,
                       labeled_keys: Sequence[str] | None = None,
                       write: bool = True) -> Split:
  """Reads the split files of `domain` from `directory`, or makes and writes them.

  Existing files win (so a resumed run cannot silently draw a different subset);
  they are checked against the request and against the record `<domain>.json` (module doc):
  a different labeled count or a list that differs from its record raises a DataError
  naming the file. `write=False` (a process that only reads; eval) never writes.
  """
  lab_path, unl_path = split_paths(directory, domain)
  record_path = os.path.join(directory, f"{domain}.json")
  ordered = _sorted_unique(examples)
  by_key = {ex.key: ex for ex in ordered}
  drawn = make_split(ordered, num_labeled, seed,
                     unlabeled_includes_labeled=unlabeled_includes_labeled,
                     labeled_keys=labeled_keys)
  record_exists = os.path.exists(record_path)
  record = _read_record(record_path)
  new = not (record_exists or os.path.exists(lab_path) or os.path.exists(unl_path))
  lists = {}
  for kind, path, fresh in (("labeled", lab_path, drawn.labeled),
                            ("unlabeled", unl_path, drawn.unlabeled)):
    keys, problem = None, "is missing"
    if os.path.exists(path):
      try:
        keys = read_keys(path)
        _check_keys(keys, by_key, path)
      except DataError as e:
        keys, problem = None, f"does not read ({str(e).partition(': ')[2]})"
    if keys is not None and record is not None and _record(keys) != record[kind]:
      raise DataError(f"{path}: differs from the split this run recorded in {record_path} "
                      f"({record[kind]['count']} keys)\nhint: if you edited it, delete "
                      f"{record_path} to keep the edit; otherwise delete {path} to draw it "
                      "again from the seed")
    if keys is None:
      keys = [ex.key for ex in fresh]
      if record is None and not new:
        raise DataError(f"{path}: {problem}, and {record_path}, which would allow drawing it "
                        "again, is missing or damaged\nhint: delete the split lists of "
                        f"{domain!r} to draw both again from the seed, or restore the file")
      if record is not None and _record(keys) != record[kind]:
        raise DataError(f"{path}: {problem}, and drawn again from the seed it differs from the "
                        f"split this run recorded in {record_path} (the dataset, "
                        "num_labeled or the seed changed)\nhint: restore the file from a "
                        "backup, or train in a new --workdir")
      if record is not None:
        log.warning("%s %s; drew it again from the seed (it matches %s)", path, problem,
                    record_path)
      if write:
        _write_lines(path, keys)
    lists[kind] = keys
  if record is None and write:  # written last: a list without it is checked as above
    if not new:
      log.warning("%s %s; recorded the split lists as they are", record_path,
                  "did not read" if record_exists else "was missing")
    files.write_json(record_path, {k: _record(v) for k, v in lists.items()})
  labeled = _select(by_key, lists["labeled"], lab_path)
  unlabeled = _select(by_key, lists["unlabeled"], unl_path)
  lab_keys, unl_keys = lists["labeled"], lists["unlabeled"]
  if labeled_keys is not None:
    if sorted(labeled_keys) != sorted(lab_keys):
      raise DataError(f"{lab_path}: existing labeled list differs from the requested "
                      "labeled keys; use another work directory or delete the file")
  else:
    expected = len(ordered) if num_labeled <= 0 or num_labeled >= len(ordered) else num_labeled
    if len(lab_keys) != expected:
      raise DataError(f"{lab_path}: holds {len(lab_keys)} labeled keys but num_labeled="
                      f"{num_labeled} asks for {expected}; use another work directory "
                      "or delete the split files")
  overlap = set(lab_keys) & set(unl_keys)
  if unlabeled_includes_labeled and len(overlap) != len(lab_keys):
    raise DataError(f"{unl_path}: existing unlabeled list excludes labeled keys but "
                    "unlabeled_includes_labeled=True was requested")
  if not unlabeled_includes_labeled and overlap:
    raise DataError(f"{unl_path}: existing unlabeled list includes labeled keys but "
                    "unlabeled_includes_labeled=False was requested")
  return Split(labeled=labeled, unlabeled=unlabeled)
