"""The unlabeled training images of every domain, as a seeded stream of view pairs.

Which images: every domain's labeled and unlabeled pools of the run (`domains.build_domains`:
the training split minus the validation hold-out), so validation images are never seen; labels
are never read (each example's label path is dropped before decoding).

The stream is host-side and single-producer: one NumPy generator (seeded) draws every choice in
a fixed order, so a seed gives the same batches on every run. A background thread builds the
next batches while the device trains on the current one; decoded, resized images are cached,
since decoding dominates the cost of small crops.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from usss_jax import domains as domains_lib
from usss_jax.data import transforms
from usss_jax.data.base import DatasetReader, DataError, Example
from usss_jax.self_supervised import views


@dataclasses.dataclass
class UnlabeledDomain:
  """The images one domain lends to pretraining.

  Attributes:
    name: the domain's name.
    reader: decodes its examples.
    examples: training examples minus the hold-out, sorted by key, without label paths.
    resize_hw: the domain's fixed training resize (None = keep).
    view_config: how the two views of its images are drawn (crop = the domain's crop).
  """
  name: str
  reader: DatasetReader
  examples: list[Example]
  resize_hw: tuple[int, int] | None
  view_config: views.ViewConfig


def unlabeled_domains(domains: Sequence[domains_lib.Domain], *,
                      max_shift_cells: tuple[int, int] = (3, 4),
                      scale_range: tuple[float, float] | None = None,
                      strong=None) -> list[UnlabeledDomain]:
  """Every domain of a run with its pretraining images: its labeled and unlabeled pools.

  Args:
    domains: the run's domains (`domains.build_domains`: readers, pools without the hold-out).
    max_shift_cells: `views.ViewConfig.max_shift_cells`.
    scale_range: random scale of the views; None = each domain's training scale_range.
    strong: `strong_augment.StrongAugmentConfig` of the views' photometric noise (None: the
      default UniMatch strength).
  """
  out = []
  for d in domains:
    by_key = {ex.key: dataclasses.replace(ex, label_path=None) for ex in d.labeled + d.unlabeled}
    view_kwargs = dict(crop_hw=tuple(d.crop_hw), max_shift_cells=tuple(max_shift_cells),
                       scale_range=tuple(scale_range or d.scale_range), flip=bool(d.flip))
    if strong is not None:
      view_kwargs["strong"] = strong
    out.append(UnlabeledDomain(name=d.name, reader=d.reader,
                               examples=[by_key[k] for k in sorted(by_key)],
                               resize_hw=d.resize_hw, view_config=views.ViewConfig(**view_kwargs)))
  return out


class ViewPairStream:
  """Infinite seeded batches of view pairs, the same number of images from every domain.

  Each domain's images are visited in shuffled epochs (every image equally often).
  Yields {domain: {"view_1": [B, h, w, 3] float32, "view_2": [B, h, w, 3] float32 (normalised
  as the segmentation training input), "offsets": [B, 2] int32 (dy, dx)}}, B = batch_per_domain.
  `get_state()` is the position after the last batch yielded (the prefetch thread runs ahead,
  so each batch carries the position it leaves); `set_state` before iterating resumes there.
  """

  def __init__(self, domains: Sequence[UnlabeledDomain], batch_per_domain: int, seed: int, *,
               normalization: str = "imagenet", prefetch: int = 2):
    if batch_per_domain < 1:
      raise ValueError(f"batch_per_domain must be >= 1, got {batch_per_domain}")
    for d in domains:
      if not d.examples:
        raise DataError(f"domain {d.name!r} has no training images to pretrain on")
    self.domains = list(domains)
    self.batch_per_domain = int(batch_per_domain)
    self.normalization = normalization
    self._rng = np.random.default_rng(seed)
    self._order = {d.name: np.zeros(0, np.int64) for d in self.domains}
    self._cache: dict[tuple[str, str], np.ndarray] = {}
    self._prefetch = int(prefetch)
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._yielded = self._position()

  def decoded(self, domain: UnlabeledDomain, example: Example) -> np.ndarray:
    """[H, W, 3] uint8 image of `example` after the domain's resize (cached)."""
    key = (domain.name, example.key)
    image = self._cache.get(key)
    if image is None:
      loaded = domain.reader.load_example(example)  # no label path: the label is never read
      image = loaded["image"]
      if domain.resize_hw is not None:
        image, _ = transforms.resize(image, None, domain.resize_hw)
      self._cache[key] = image
    return image

  def _next_indices(self, domain: UnlabeledDomain) -> np.ndarray:
    order = self._order[domain.name]
    while len(order) < self.batch_per_domain:
      order = np.concatenate([order, self._rng.permutation(len(domain.examples))])
    self._order[domain.name] = order[self.batch_per_domain:]
    return order[:self.batch_per_domain]

  def _position(self) -> dict:
    """The generator's state and the rest of each domain's epoch: what the next batch draws."""
    return {"rng": self._rng.bit_generator.state,
            "order": {name: order.tolist() for name, order in self._order.items()}}

  def get_state(self) -> dict:
    """JSON-serialisable position after the last batch yielded."""
    return self._yielded

  def set_state(self, state: dict) -> None:
    """Resumes at a position of `get_state()` (call before iterating)."""
    if set(state["order"]) != set(self._order):
      raise ValueError(f"the saved stream has domains {sorted(state['order'])}, this one "
                       f"{sorted(self._order)}")
    self._rng.bit_generator.state = state["rng"]
    self._order = {name: np.asarray(order, np.int64) for name, order in state["order"].items()}
    self._yielded = self._position()

  def _batch_and_position(self) -> tuple[dict, dict]:
    return self.make_batch(), self._position()

  def make_batch(self) -> dict[str, dict[str, np.ndarray]]:
    """The next batch (draws from the stream's generator; not thread-safe)."""
    batch = {}
    for domain in self.domains:
      first, second, offsets = [], [], []
      for index in self._next_indices(domain):
        image = self.decoded(domain, domain.examples[int(index)])
        view_1, view_2, offset = views.two_views(image, self._rng, domain.view_config)
        first.append(transforms.normalize(view_1, self.normalization))
        second.append(transforms.normalize(view_2, self.normalization))
        offsets.append(offset)
      batch[domain.name] = {"view_1": np.stack(first), "view_2": np.stack(second),
                            "offsets": np.asarray(offsets, np.int32)}
    return batch

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        item = self._batch_and_position()
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # handed to the consumer, which re-raises it
      self._queue.put(e)

  def __iter__(self) -> Iterator[dict[str, dict[str, np.ndarray]]]:
    if self._prefetch <= 0:
      while True:
        batch, self._yielded = self._batch_and_position()
        yield batch
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._thread = threading.Thread(target=self._produce, name="view-pairs", daemon=True)
    self._thread.start()
    try:
      while True:
        item = self._queue.get()
        if isinstance(item, BaseException):
          raise item
        batch, self._yielded = item
        yield batch
    finally:
      self.close()

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
