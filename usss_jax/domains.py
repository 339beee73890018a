"""Domains: one record per dataset of a run, resolved from the config.

A `Domain` is what every later stage needs to know about one dataset: its reader (label
space, decoding), the reproducible labeled / unlabeled split of its training images, its
evaluation examples, and how images are cropped and resized. The input pipeline, evaluation,
the label-embedding stage and the analyses all take `Domain`s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import ml_collections
import numpy as np

from usss_jax import config as config_lib
from usss_jax import files
from usss_jax import workdir as workdir_lib
from usss_jax.data import demo, registry, splits
from usss_jax.data.base import DataError, DatasetReader, DatasetSpec, Example

log = logging.getLogger("usss_jax")


@dataclasses.dataclass
class Domain:
  """One dataset of a run.

  Attributes:
    name: the domain's name (key of `config.domains`, of batches and of results).
    index: its head index (position in `config.domain_names`).
    reader: decodes examples; `reader.spec` is the label space.
    labeled / unlabeled: training examples of the two streams.
    eval_examples: examples of the evaluation split (may be empty).
    crop_hw: training crop (H, W).
    resize_hw: fixed (H, W) every training image is resized to first (None = keep).
    eval_resize_hw: (H, W) the network sees at evaluation (None = full resolution); logits
      are resized back, so metrics are at label resolution.
    scale_range: random scale factor range of training crops.
    flip: random horizontal flips of training crops.
  """
  name: str
  reader: DatasetReader
  labeled: list[Example]
  unlabeled: list[Example] = dataclasses.field(default_factory=list)
  eval_examples: list[Example] = dataclasses.field(default_factory=list)
  index: int = 0
  crop_hw: tuple[int, int] | None = None
  resize_hw: tuple[int, int] | None = None
  eval_resize_hw: tuple[int, int] | None = None
  scale_range: tuple[float, float] = (1.0, 1.0)
  flip: bool = True

  @property
  def spec(self) -> DatasetSpec:
    return self.reader.spec

  @property
  def num_classes(self) -> int:
    return self.reader.spec.num_classes

  @property
  def classes(self) -> tuple[str, ...]:
    return self.reader.spec.classes

  @property
  def palette(self) -> np.ndarray:
    """[C, 3] uint8."""
    return self.reader.spec.palette_array()


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """What a trained model predicts for a domain, without its data: the dataset's label space
  (`DatasetSpec`: classes, palette) and the input sizes.

  Saved at training time (`save_label_spaces`) so that a run directory alone can segment
  images (`usss_jax.Segmenter`).
  """
  name: str
  spec: DatasetSpec
  crop_hw: tuple[int, int] | None = None
  eval_resize_hw: tuple[int, int] | None = None

  @property
  def classes(self) -> tuple[str, ...]:
    return self.spec.classes

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  def palette_array(self) -> np.ndarray:
    """[C, 3] uint8."""
    return self.spec.palette_array()


def _hw(value) -> tuple[int, int] | None:
  return tuple(int(v) for v in value) if value else None


LABEL_SPACES_FILE = "label_spaces.json"


def save_label_spaces(workdir: str, domains: Sequence[Domain]) -> str:
  """Writes `<workdir>/label_spaces.json`: per domain its classes, palette and sizes."""
  entries = [{"name": d.name, "dataset": d.spec.name, "classes": list(d.classes),
              "palette": [[int(v) for v in c] for c in d.spec.palette],
              "crop_hw": d.crop_hw, "eval_resize_hw": d.eval_resize_hw} for d in domains]
  return files.write_json(os.path.join(workdir, LABEL_SPACES_FILE), {"domains": entries})


def load_label_spaces(workdir: str) -> list[LabelSpace]:
  """The label spaces a run was trained with, in head order."""
  path = os.path.join(workdir, LABEL_SPACES_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file; {workdir} is not a run directory of this "
                            "version (train it again, or pass --config to read its datasets)")
  entries = files.read_json(path, "label spaces")["domains"]
  return [LabelSpace(e["name"],
                     DatasetSpec(e.get("dataset", e["name"]), tuple(e["classes"]),
                                 tuple(tuple(c) for c in e["palette"])),
                     _hw(e["crop_hw"]), _hw(e["eval_resize_hw"]))
          for e in entries]


def make_reader(domain_config: ml_collections.ConfigDict) -> DatasetReader:
  """The reader of one `config.domains.<name>` entry (writing the demo data on first use)."""
  if domain_config.get("generate_demo", False):
    demo.ensure_demo_data(os.path.dirname(os.path.abspath(os.path.expanduser(
        domain_config.root))))
  options = domain_config.options.to_dict() if "options" in domain_config else {}
  return registry.get_reader(domain_config.dataset, domain_config.root, **options)


def _root_hint(name: str, root: str) -> str:
  return (f"hint: point --config.domains.{name}.root (now {root}) at the dataset in its "
          "official layout, or set $USSS_DATA_ROOT to the folder holding the datasets")


def _check_pool(config: ml_collections.ConfigDict, name: str, pool: int,
                needs_unlabeled: bool) -> None:
  """A num_labeled above the domain's pool of training images is an error naming the pool
  size (a warning with config.num_labeled_above_pool="warn"); a method that trains on
  unlabeled images refuses an empty unlabeled pool."""
  num_labeled = int(config.num_labeled)
  if num_labeled > pool:
    message = (f"config.num_labeled={num_labeled} is more than the {pool} training images of "
               f"domain {name!r}")
    if config.get("num_labeled_above_pool", "error") != "warn":
      raise config_lib.ConfigError(
          f"{message}\nhint: use --config.num_labeled={pool} or less (<= 0 labels every image), "
          "or --config.num_labeled_above_pool=warn to label all of them")
    log.warning("%s: all %d are labeled (num_labeled_above_pool=warn)", message, pool)
  labeled_all = num_labeled <= 0 or num_labeled >= pool
  if needs_unlabeled and labeled_all and not config.unlabeled_includes_labeled:
    raise config_lib.ConfigError(
        f"domain {name!r}: no unlabeled images left (config.num_labeled={num_labeled} labels "
        f"all {pool} training images) and config.method={config.method!r} trains on unlabeled "
        f"images\nhint: lower --config.num_labeled below {pool}, set "
        "--config.unlabeled_includes_labeled=True, or train --config.method=basic")


def build_domains(config: ml_collections.ConfigDict, workdir: str, *, write_splits: bool = True,
                  needs_unlabeled: bool = False) -> list[Domain]:
  """Readers and reproducible labeled/unlabeled splits.

  Args:
    workdir: the run directory; its `splits/<domain>.{labeled,unlabeled}.txt` are read when
      they exist.
    write_splits: training (True) checks the pools (`_check_pool`) and writes new split lists
      to `<workdir>/splits`; reading a run (evaluation, prediction, analyses: False) writes
      nothing and makes a missing split in memory.
    needs_unlabeled: the method trains on unlabeled images (an empty pool is an error).
  """
  config_lib.check_dataset_roots(config)
  if not write_splits:
    return _build_domains(config, workdir, False, needs_unlabeled)
  # On several processes, process 0 builds them first (it writes the demo data and the split
  # files), then the others read them.
  with workdir_lib.main_process_first("domains") as writer:
    return _build_domains(config, workdir, True, needs_unlabeled, writer=writer)


def _build_domains(config: ml_collections.ConfigDict, workdir: str, write_splits: bool,
                   needs_unlabeled: bool, writer: bool = False) -> list[Domain]:
  out = []
  for index, name in enumerate(config.domain_names):
    dc = config.domains[name]
    try:
      reader = make_reader(dc)
      reader.invalid_labels = config.get("invalid_labels", "error")
      train_examples = reader.list_examples(dc.train_split)
      listed_eval = (reader.list_examples(dc.eval_split)
                     if dc.eval_split and dc.eval_split != "holdout" else [])
    except DataError as e:
      raise DataError(f"domain {name!r}: {e}\n{_root_hint(name, dc.root)}") from e
    held_out = []
    if dc.get("holdout", 0) > 0:
      # Validation data carved out of the training split, the same for every run.
      held_out, train_examples = splits.hold_out(train_examples, dc.holdout)
    split_dir = os.path.join(workdir, "splits")
    if write_splits:
      _check_pool(config, name, len(train_examples), needs_unlabeled)
    if write_splits or os.path.exists(splits.split_paths(split_dir, name)[0]):
      split = splits.load_or_make_split(
          train_examples, split_dir, name, config.num_labeled, config_lib.split_seed(config),
          unlabeled_includes_labeled=config.unlabeled_includes_labeled, write=writer)
    else:
      split = splits.make_split(train_examples, config.num_labeled, config_lib.split_seed(config),
                                unlabeled_includes_labeled=config.unlabeled_includes_labeled)
    eval_examples = held_out if dc.eval_split == "holdout" else listed_eval
    for split_name, skipped in (getattr(reader, "skipped", None) or {}).items():
      if skipped:  # only with options.skip_unpaired=True; otherwise unpaired files are errors
        log.warning("%s: skipped %d unpaired file(s) in split %r, e.g. %s", name, len(skipped),
                    split_name, skipped[0])
    if config.eval_max_examples > 0:
      eval_examples = eval_examples[:config.eval_max_examples]
    out.append(Domain(
        name=name, reader=reader, labeled=split.labeled, unlabeled=split.unlabeled,
        eval_examples=eval_examples, index=index, crop_hw=_hw(dc.crop),
        resize_hw=_hw(dc.resize), eval_resize_hw=_hw(dc.get("eval_resize", ())),
        scale_range=tuple(float(v) for v in dc.scale_range), flip=bool(dc.flip)))
  return out
