"""TrainInput: determinism, infinite streams, sharding, per-host slicing, state, workers."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P
from PIL import Image

from usss_jax import sharding
from usss_jax.data import pipeline
from usss_jax.data.base import DatasetReader, DatasetSpec, Example, load_label_png
from usss_jax.domains import Domain

NUM_EXAMPLES = 10
H, W = 12, 16


class TinyReader(DatasetReader):
  """`<root>/img/NN.png`, `<root>/lab/NN.png`; label = example index everywhere."""

  spec = DatasetSpec("tiny", tuple(f"c{i}" for i in range(NUM_EXAMPLES)),
                     tuple((i, i, i) for i in range(NUM_EXAMPLES)))

  def splits(self):
    return ["train"]

  def list_examples(self, split):
    names = sorted(f[:-4] for f in os.listdir(os.path.join(self.root, "img")))
    return [Example(n, os.path.join(self.root, "img", n + ".png"),
                    os.path.join(self.root, "lab", n + ".png")) for n in names]

  def decode_label(self, path):
    return load_label_png(path).astype(np.uint8)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  os.makedirs(root / "img")
  os.makedirs(root / "lab")
  yy, xx = np.mgrid[0:H, 0:W]
  for i in range(NUM_EXAMPLES):
    # Channel 0 identifies the example; 1 and 2 encode the position.
    image = np.stack([np.full((H, W), 20 * i), 10 * yy, 10 * xx], -1).astype(np.uint8)
    Image.fromarray(image).save(root / "img" / f"{i:02d}.png")
    Image.fromarray(np.full((H, W), i, np.uint8)).save(root / "lab" / f"{i:02d}.png")
  return TinyReader(str(root))


def _domain(reader, name="tiny", num_labeled=4, crop_hw=(8, 8), unlabeled=True):
  exs = reader.list_examples("train")
  return Domain(name=name, labeled=exs[:num_labeled],
                unlabeled=exs[num_labeled:] if unlabeled else [], reader=reader, crop_hw=crop_hw)


def _make(reader, domains=None, **kw):
  args = dict(labeled_batch=4, unlabeled_batch=6, seed=0, mesh=None, normalization="none")
  args.update(kw)
  return pipeline.TrainInput(domains or [_domain(reader)], **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _ids(images):
  """Example index of every row (channel 0 = 20 * index)."""
  ids = np.rint(np.asarray(images)[..., 0] * 255 / 20).astype(int)
  assert (ids == ids[:, :1, :1]).all()
  return ids[:, 0, 0].tolist()


def _assert_batches_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_batch_structure_and_contents(reader):
  with _make(reader) as it:
    batch = next(it)
  assert set(batch) == {"tiny"} and set(batch["tiny"]) == {"labeled", "unlabeled"}
  lab, unl = batch["tiny"]["labeled"], batch["tiny"]["unlabeled"]
  assert lab["image"].shape == (4, 8, 8, 3) and lab["image"].dtype == np.float32
  assert lab["label"].shape == (4, 8, 8) and lab["label"].dtype == np.int32
  assert set(unl) == {"image"} and unl["image"].shape == (6, 8, 8, 3)
  # Labeled rows come from the labeled examples, with their own labels.
  assert set(_ids(lab["image"])) <= {0, 1, 2, 3}
  assert _ids(lab["image"]) == lab["label"][:, 0, 0].tolist()
  assert set(_ids(unl["image"])) <= set(range(4, 10))


def test_deterministic_given_seed(reader):
  a, b, c = (_take(_make(reader, seed=s), 3) for s in (0, 0, 1))
  _assert_batches_equal(a, b)
  assert any(_ids(x["tiny"]["unlabeled"]["image"]) != _ids(y["tiny"]["unlabeled"]["image"])
             for x, y in zip(a, c))


def test_streams_are_infinite_and_reshuffled_per_epoch(reader):
  it = _make(reader, domains=[_domain(reader, num_labeled=3)], labeled_batch=2,
             unlabeled_batch=4)
  batches = _take(it, 6)
  labeled_ids = sum((_ids(b["tiny"]["labeled"]["image"]) for b in batches), [])
  epochs = [tuple(labeled_ids[i:i + 3]) for i in range(0, 12, 3)]
  assert all(sorted(e) == [0, 1, 2] for e in epochs)  # each epoch = each example once
  assert len(set(epochs)) > 1  # new order per epoch
  unlabeled_ids = sum((_ids(b["tiny"]["unlabeled"]["image"]) for b in batches), [])
  for i in range(0, 21, 7):  # unlabeled pool of 7, batch 4: epochs straddle batches
    assert sorted(unlabeled_ids[i:i + 7]) == list(range(3, 10))


def test_unlabeled_entries_omitted(reader):
  batch = next(_make(reader, unlabeled_batch=0))
  assert set(batch["tiny"]) == {"labeled"}
  batch = next(_make(reader, domains=[_domain(reader, name="a"),
                                      _domain(reader, name="b", unlabeled=False)]))
  assert set(batch["a"]) == {"labeled", "unlabeled"} and set(batch["b"]) == {"labeled"}


def test_adding_a_domain_does_not_change_another(reader):
  alone = _take(_make(reader, domains=[_domain(reader, name="a")]), 2)
  both = _take(_make(reader, domains=[_domain(reader, name="z", num_labeled=6),
                                      _domain(reader, name="a")]), 2)
  _assert_batches_equal(alone, [{"a": b["a"]} for b in both])
  assert _ids(both[0]["z"]["labeled"]["image"]) != _ids(both[0]["a"]["labeled"]["image"])


def test_make_mesh_is_auto():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == 8
  assert mesh.axis_types == (AxisType.Auto,)
  assert sharding.make_mesh(4).shape["data"] == 4
  assert sharding.local_mesh().devices.size == 8
  assert sharding.single_device_mesh().devices.size == 1
  with pytest.raises(ValueError, match="num_devices=9"):
    sharding.make_mesh(9)


def test_sharded_batches_match_unsharded(reader):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  sharded = _take(_make(reader, mesh=mesh, labeled_batch=8, unlabeled_batch=16), 2)
  plain = _take(_make(reader, mesh=None, labeled_batch=8, unlabeled_batch=16), 2)
  for s in sharded:
    for kind, rows in (("labeled", 1), ("unlabeled", 2)):
      for name, arr in s["tiny"][kind].items():
        assert isinstance(arr, jax.Array)
        assert arr.sharding.spec == P("data") and arr.sharding.mesh == mesh
        assert len(arr.addressable_shards) == 8
        assert {sh.device for sh in arr.addressable_shards} == set(jax.devices())
        assert all(sh.data.shape[0] == rows for sh in arr.addressable_shards)
        assert arr.shape[0] == 8 * rows
  _assert_batches_equal(sharded, plain)


def test_batch_divisibility_errors(reader):
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match="labeled_batch=4 .*data axis \\(8\\)"):
    _make(reader, mesh=mesh, labeled_batch=4, unlabeled_batch=8)
  with pytest.raises(ValueError, match="unlabeled_batch=12 .*data axis \\(8\\)"):
    _make(reader, mesh=mesh, labeled_batch=8, unlabeled_batch=12)
  with pytest.raises(ValueError, match="labeled_batch=4 .*processes \\(3\\)"):
    _make(reader, labeled_batch=4, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="no data axis 'data'"):
    _make(reader, mesh=Mesh(np.asarray(jax.devices()), ("batch",)), labeled_batch=8,
          unlabeled_batch=8)


def test_per_host_slices_assemble_the_single_host_batch(reader):
  single = _take(_make(reader), 3)
  hosts = [_take(_make(reader, process_index=p, process_count=2), 3) for p in range(2)]
  for step in range(3):
    for kind, rows in (("labeled", 2), ("unlabeled", 3)):
      for name in single[step]["tiny"][kind]:
        parts = [hosts[p][step]["tiny"][kind][name] for p in range(2)]
        assert parts[0].shape[0] == rows
        np.testing.assert_array_equal(np.concatenate(parts), single[step]["tiny"][kind][name])
        sl = pipeline.host_slice(2 * rows, 1, 2)
        np.testing.assert_array_equal(parts[1], single[step]["tiny"][kind][name][sl])


def test_state_restores_next_batch(reader):
  it = _make(reader)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  fresh = _make(reader)
  fresh.set_state(state)
  assert fresh.next_step == 2
  _assert_batches_equal(_take(fresh, 2), expected)
  it.set_state(state)  # rewinding the same object works too
  _assert_batches_equal(_take(it, 2), expected)
  with pytest.raises(ValueError, match="different configuration"):
    _make(reader, seed=1).set_state(state)
  with pytest.raises(ValueError, match="not a TrainInput state"):
    fresh.set_state({"next_step": 1})


def test_workers_match_in_process(reader):
  domains = [_domain(reader, name="a"), _domain(reader, name="b", num_labeled=6)]
  reference = _make(reader, domains=domains)
  expected = _take(reference, 4)
  state = reference.get_state()
  state["next_step"] = 1
  with _make(reader, domains=domains, worker_count=2) as it:
    it.set_state(state)  # workers start at step 1 (one start keeps the test fast)
    got = _take(it, 3)
    assert it.get_state()["next_step"] == 4
  _assert_batches_equal(got, expected[1:])
