"""Device meshes and array placement: the one place that decides where arrays live.

Training uses a 1-D mesh over every device with the batch sharded on its "data" axis and the
state replicated (so BatchNorm statistics of a batch-sharded forward are global, i.e.
synchronised BN). Evaluation and analysis run on each process's own devices.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
  """1-D mesh with an *Auto* "data" axis over `devices` (default: the first `num_devices`).

  `jax.make_mesh` defaults to Explicit axes, under which gathers and `bincount` on
  batch-sharded arrays raise ShardingTypeError; Auto keeps ordinary code working.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def local_mesh() -> Mesh:
  """This process's own devices (evaluation: each process runs its slice of the split)."""
  return make_mesh(devices=jax.local_devices())


def single_device_mesh() -> Mesh:
  """The first local device (small offline analyses)."""
  return make_mesh(devices=jax.local_devices()[:1])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh's "data" axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def to_local_replicated(tree, mesh: Mesh):
  """Copies (replicated) global arrays onto every device of `mesh` (this process's)."""
  def copy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return jax.device_put(np.asarray(x), replicated(mesh))
  return jax.tree.map(copy, tree)


def abstract_like(tree, sharding: NamedSharding | None = None):
  """ShapeDtypeStructs of `tree`'s arrays, with `sharding` or each array's own."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)
