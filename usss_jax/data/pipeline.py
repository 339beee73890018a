"""Infinite per-domain training streams -> global batches sharded over the mesh.

For every domain there is a labeled stream and (optionally) an unlabeled stream.
Each stream is a grain `MapDataset`:

  source(examples) -> shuffle (reshuffled every epoch) -> repeat forever
    -> random_map(load + augment) -> batch(per-host batch) -> [host::num_hosts]

Batching to the *per-host* size first and then taking every `num_hosts`-th chunk
means global step `s` of host `p` holds rows `[p*b, (p+1)*b)` of the global
batch that a single process would build, so the data does not depend on the
number of hosts. All streams are zipped into one `MapDataset` indexed by step,
which makes the state a single integer (the next step) and lets grain workers
(`mp_prefetch`) split whole steps between them without changing any value.

Randomness: every stream gets its own shuffle and augmentation seeds derived
from (seed, domain name, labeled/unlabeled), so adding a domain does not change
the other domains' data; grain seeds the augmentation of element `i` from
(map seed, i), independent of threads and workers.

Worker processes (`worker_count > 0`) are started with the `spawn` method and
re-import the main module: scripts using them need an
`if __name__ == "__main__":` guard. grain reads absl flags in the workers; if
the flags are not parsed yet (no `absl.app.run`), they are marked parsed with
their defaults here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from typing import Any, Sequence

from absl import flags
import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from usss_jax import sharding
from usss_jax.data.base import DataError, Example
from usss_jax.data.strong_augment import StrongAugmentConfig
from usss_jax.data.transforms import LoadAndAugment
from usss_jax.domains import Domain

_STATE_FORMAT = "usss_jax.TrainInput/1"
_KINDS = ("labeled", "unlabeled")
# Per-element bookkeeping of skip_bad_images, taken out of the batches before they are returned.
_SKIPPED = "bad_images_skipped"
_SKIPPED_FROM = "bad_image_index"
MAX_REPORTED_BAD_IMAGES = 10


def _stream_seeds(seed: int, domain: str, kind: str) -> tuple[int, int]:
  """(shuffle seed, augmentation seed), uint32, stable across runs and machines."""
  entropy = [seed % 2**32, seed // 2**32, zlib.crc32(domain.encode()), _KINDS.index(kind)]
  a, b = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
  return int(a), int(b)


def _keys_digest(examples: Sequence[Example]) -> str:
  return hashlib.sha1("\n".join(ex.key for ex in examples).encode()).hexdigest()[:16]


def _ensure_absl_flags_parsed() -> None:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class StreamTransform:
  """A stream's `(Example, rng) -> arrays` map: data errors name the domain and the stream.

  With `skip_bad_images`, an example that fails to load is replaced by the next loadable one
  of the stream's (sorted) examples, deterministically; each element then also carries how
  many it skipped and the index of the first skipped one (-1: none).
  """

  def __init__(self, transform: LoadAndAugment, examples: Sequence[Example], domain: str,
               kind: str, skip_bad_images: bool = False):
    self.transform, self.examples = transform, list(examples)
    self.domain, self.kind, self.skip_bad_images = domain, kind, skip_bad_images
    self._positions = {ex.key: i for i, ex in enumerate(self.examples)}

  def __call__(self, example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    start = self._positions[example.key]
    for skipped in range(len(self.examples)):
      candidate = self.examples[(start + skipped) % len(self.examples)]
      try:
        out = self.transform(candidate, rng)  # a failing load draws nothing from rng
      except DataError as e:
        if not self.skip_bad_images:
          raise DataError(f"domain {self.domain!r}, {self.kind} stream: {e}") from e
        continue
      if self.skip_bad_images:
        out[_SKIPPED] = np.int32(skipped)
        out[_SKIPPED_FROM] = np.int32(start if skipped else -1)
      return out
    raise DataError(f"domain {self.domain!r}, {self.kind} stream: none of its "
                    f"{len(self.examples)} images loads (skip_bad_images=True)")


def _check_divisible(what: str, size: int, process_count: int, data_devices: int | None):
  if size % process_count:
    raise ValueError(f"{what}={size} is not divisible by the number of processes "
                     f"({process_count})")
  if data_devices is not None and size % data_devices:
    raise ValueError(f"{what}={size} is not divisible by the number of devices on the "
                     f"data axis ({data_devices})")


class TrainInput:
  """Iterator of global training batches for all domains.

  `next()` returns
    {domain: {"labeled": {"image": f32[B, h, w, 3], "label": i32[B, h, w]},
              "unlabeled": {"image": f32[B_u, h, w, 3]}}}
  as jax.Arrays sharded `P(data_axis)` over `mesh` (NumPy arrays when mesh is
  None). "unlabeled" is absent when `unlabeled_batch == 0` or the domain has no
  unlabeled examples.

  Args:
    domains: the domains (names must be unique); their examples, reader, crop and resize.
    labeled_batch, unlabeled_batch: *global* batch sizes per domain.
    seed: all shuffling and augmentation derive from it.
    mesh: device mesh; None = return host NumPy arrays.
    normalization: "imagenet" or "none" (see `transforms.normalize`).
    worker_count: grain worker processes (0 = in-process threads only).
    data_axis: mesh axis the batch dimension is sharded over.
    read_threads: threads per process computing steps ahead.
    cache_mb: decoded (resized) images kept in memory per stream, in MiB.
    strong: strong views of unlabeled images (consistency): the unlabeled batches then also
      hold "strong" [B_u, h, w, 3], "cutmix_mask" and "valid" [B_u, h, w] bool.
    skip_bad_images: replace an image that fails to load by the next loadable one of its
      stream (counted in `bad_images_skipped`) instead of raising DataError.
    prefetch_steps: steps buffered ahead per process.
    process_index, process_count: host slice to produce; default = JAX's. Only
      overridable with mesh=None (to test the per-host logic in one process).
  """

  def __init__(self, domains: Sequence[Domain], *, labeled_batch: int,
               unlabeled_batch: int, seed: int, mesh: Mesh | None,
               normalization: str = "imagenet", worker_count: int = 0,
               data_axis: str = sharding.DATA_AXIS, read_threads: int = 2,
               prefetch_steps: int = 2,
               cache_mb: int = 0, strong: StrongAugmentConfig | None = None,
               skip_bad_images: bool = False,
               process_index: int | None = None, process_count: int | None = None):
    if not domains:
      raise ValueError("TrainInput needs at least one domain")
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
      raise ValueError(f"domain names must be unique, got {names}")
    if labeled_batch <= 0 or unlabeled_batch < 0:
      raise ValueError(f"need labeled_batch > 0 and unlabeled_batch >= 0, got "
                       f"{labeled_batch}, {unlabeled_batch}")
    if worker_count < 0:
      raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if (process_index is not None or process_count is not None) and mesh is not None:
      raise ValueError("process_index/process_count can only be overridden with mesh=None")
    self._process_index = jax.process_index() if process_index is None else process_index
    self._process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self._process_index < self._process_count:
      raise ValueError(f"process_index={self._process_index} outside "
                       f"[0, {self._process_count})")
    data_devices = None
    self._sharding = None
    if mesh is not None:
      if data_axis not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no data axis {data_axis!r}")
      data_devices = mesh.shape[data_axis]
      self._sharding = NamedSharding(mesh, P(data_axis))
    _check_divisible("labeled_batch", labeled_batch, self._process_count, data_devices)
    if unlabeled_batch:
      _check_divisible("unlabeled_batch", unlabeled_batch, self._process_count, data_devices)

    self._labeled_batch = labeled_batch
    self._unlabeled_batch = unlabeled_batch
    self._worker_count = worker_count
    self._skip_bad_images = skip_bad_images
    self.bad_images_skipped = 0  # over the whole run (restored with the state)
    self.bad_images: list[str] = []  # the first few this process met: "<domain> <kind> <path>"
    self._read_options = grain.ReadOptions(num_threads=read_threads,
                                           prefetch_buffer_size=prefetch_steps)
    # Streams in a fixed order: (domain, kind, global batch size, MapDataset of host batches).
    self._streams: list[tuple[str, str, int, list[Example]]] = []
    parts = []
    for d in domains:
      if not d.labeled:
        raise ValueError(f"domain {d.name!r} has no labeled examples")
      kinds = [("labeled", d.labeled, labeled_batch)]
      if unlabeled_batch and d.unlabeled:
        kinds.append(("unlabeled", d.unlabeled, unlabeled_batch))
      for kind, examples, batch in kinds:
        transform = LoadAndAugment(
            d.reader, with_label=kind == "labeled", crop_hw=d.crop_hw,
            resize_hw=d.resize_hw, scale_range=d.scale_range, flip=d.flip,
            normalization=normalization, cache_bytes=cache_mb << 20,
            strong=strong if kind == "unlabeled" else None)
        stream_transform = StreamTransform(transform, examples, d.name, kind, skip_bad_images)
        parts.append(self._stream(examples, batch // self._process_count, stream_transform,
                                  *_stream_seeds(seed, d.name, kind)))
        self._streams.append((d.name, kind, batch, list(examples)))
    length = min(len(p) for p in parts)  # all "infinite"; zip wants equal lengths
    self._steps = grain.experimental.ZipMapDataset([p[:length] for p in parts])
    self._fingerprint = self._make_fingerprint(domains, seed, normalization, strong)
    self._next_step = 0
    self._iterator = None
    if worker_count:
      _ensure_absl_flags_parsed()

  def _stream(self, examples: Sequence[Example], host_batch: int, transform: StreamTransform,
              shuffle_seed: int, map_seed: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(list(examples))
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)  # shuffle first: new order every epoch
    ds = ds.random_map(transform, seed=map_seed)
    ds = ds.batch(host_batch, drop_remainder=True)
    return ds[self._process_index::self._process_count]

  def _make_fingerprint(self, domains, seed, normalization, strong) -> str:
    desc = {
        "strong": dataclasses.asdict(strong) if strong is not None else None,
        "seed": seed, "labeled_batch": self._labeled_batch,
        "unlabeled_batch": self._unlabeled_batch, "normalization": normalization,
        "domains": [[d.name, _keys_digest(d.labeled), _keys_digest(d.unlabeled),
                     d.crop_hw, d.resize_hw, list(d.scale_range), d.flip] for d in domains],
    }
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=list).encode()).hexdigest()

  def _start(self):
    ds = self._steps[self._next_step:].to_iter_dataset(self._read_options)
    if self._worker_count:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
    self._iterator = iter(ds)

  def __iter__(self) -> "TrainInput":
    return self

  def __next__(self) -> dict[str, dict[str, dict[str, Any]]]:
    if self._iterator is None:
      self._start()
    host_batches = next(self._iterator)
    self._next_step += 1
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (domain, kind, global_batch, examples), batch in zip(self._streams, host_batches):
      if self._skip_bad_images:
        self._count_skipped(domain, kind, examples, batch.pop(_SKIPPED),
                            batch.pop(_SKIPPED_FROM))
      if self._sharding is not None:
        batch = {k: jax.make_array_from_process_local_data(
                     self._sharding, v, (global_batch,) + v.shape[1:])
                 for k, v in batch.items()}
      out.setdefault(domain, {})[kind] = batch
    return out

  def _count_skipped(self, domain: str, kind: str, examples: Sequence[Example],
                     skipped: np.ndarray, skipped_from: np.ndarray) -> None:
    self.bad_images_skipped += int(skipped.sum())
    for index in skipped_from[skipped_from >= 0]:
      entry = f"{domain} {kind} {examples[index].image_path}"
      if len(self.bad_images) < MAX_REPORTED_BAD_IMAGES and entry not in self.bad_images:
        self.bad_images.append(entry)

  @property
  def next_step(self) -> int:
    """Index of the step the next `next()` returns."""
    return self._next_step

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position; `set_state` of it restores the next batch."""
    return {"format": _STATE_FORMAT, "next_step": self._next_step,
            "fingerprint": self._fingerprint, _SKIPPED: self.bad_images_skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("format") != _STATE_FORMAT:
      raise ValueError(f"not a TrainInput state (format {state.get('format')!r})")
    if state["fingerprint"] != self._fingerprint:
      raise ValueError("TrainInput state was saved with a different configuration "
                       "(seed, batch sizes, normalisation, domains, split lists or "
                       "augmentation differ); refusing to resume from it")
    self.close()
    self._next_step = int(state["next_step"])
    self.bad_images_skipped = int(state.get(_SKIPPED, 0))

  def close(self) -> None:
    """Stops worker processes/threads; the next `next()` restarts them."""
    if self._iterator is not None:
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
      self._iterator = None

  def __enter__(self) -> "TrainInput":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass  # interpreter shutdown


def host_slice(global_rows: int, process_index: int, process_count: int) -> slice:
  """Rows of a global batch that host `process_index` produces (contiguous)."""
  per_host = global_rows // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)
