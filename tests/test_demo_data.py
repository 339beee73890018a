"""The procedurally generated two-domain demo dataset."""

import json
import os
import pathlib
import time

import numpy as np
import pytest

from usss_jax import data
from usss_jax.data import demo

SMALL = dict(num_train=6, num_val=3, size=(48, 64), seed=3)


def tree_bytes(root):
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory):
  """The default-sized demo, generated once (its generation time is in benchmarks/)."""
  root = tmp_path_factory.mktemp("demo")
  return root, demo.ensure_demo_data(str(root))


def test_default_generation_is_complete(default_demo):
  root, paths = default_demo
  assert paths == {"street": str(root / "street"), "indoor": str(root / "indoor")}
  for domain in ("street", "indoor"):
    for split, count in (("train", 48), ("val", 16)):
      assert len(os.listdir(root / domain / "images" / split)) == count
      assert len(os.listdir(root / domain / "labels" / split)) == count
  meta = json.loads((root / demo.META_FILE).read_text())
  assert meta == {"generator_version": demo.GENERATOR_VERSION, "num_train": 48,
                  "num_val": 16, "size": [96, 128], "seed": 0}
  assert not [p for p in os.listdir(root) if p.startswith(".demo-tmp-")]


def read_domain(path, split):
  reader = data.get_reader("folder", path)
  loaded = [reader.load_example(ex) for ex in reader.list_examples(split)]
  return reader, loaded


def test_label_sets_and_value_ranges(default_demo):
  _, paths = default_demo
  street, street_train = read_domain(paths["street"], "train")
  indoor, indoor_train = read_domain(paths["indoor"], "train")
  assert street.spec.name == "street" and indoor.spec.name == "indoor"
  assert street.spec.classes == ("sky", "building", "road", "vegetation", "car")
  assert indoor.spec.classes == ("ceiling", "wall", "floor", "furniture", "window")
  assert not set(street.spec.classes) & set(indoor.spec.classes)
  for loaded, allowed in ((street_train, set(range(5)) | {255}), (indoor_train, set(range(5)))):
    values = set()
    for ex in loaded:
      assert ex["image"].shape == (96, 128, 3) and ex["image"].dtype == np.uint8
      assert ex["label"].shape == (96, 128)
      values |= set(np.unique(ex["label"]).tolist())
    assert values == allowed  # every class occurs, and nothing else
  # Street void borders exist but are a small part.
  void = np.mean([np.mean(ex["label"] == 255) for ex in street_train])
  assert 0.005 < void < 0.1


def test_shared_structure_top_bright_bottom_flat(default_demo):
  _, paths = default_demo
  for domain, top_class, bottom_class in (("street", 0, 2), ("indoor", 0, 2)):
    _, loaded = read_domain(paths[domain], "train")
    labels = np.stack([ex["label"] for ex in loaded])
    images = np.stack([ex["image"] for ex in loaded]).astype(np.float64)
    # Top rows are mostly sky/ceiling, bottom rows mostly road/floor.
    assert np.mean(labels[:, :5] == top_class) > 0.8
    assert np.mean(labels[:, -20:] == bottom_class) > 0.5
    brightness = images.mean(-1)
    assert brightness[labels == top_class].mean() > brightness[labels == bottom_class].mean() + 40


def test_colour_alone_is_not_enough(default_demo):
  """The best colour-only classifier (class majority per 32-level colour bin,
  fitted on train) stays well below what a CNN can reach on val."""
  _, paths = default_demo
  for domain in ("street", "indoor"):
    bins = 8
    def flat(split):
      _, loaded = read_domain(paths[domain], split)
      colours = np.concatenate([ex["image"].reshape(-1, 3) // 32 for ex in loaded]).astype(int)
      labels = np.concatenate([ex["label"].ravel() for ex in loaded])
      keep = labels != 255
      return ((colours[:, 0] * bins + colours[:, 1]) * bins + colours[:, 2])[keep], labels[keep]
    train_bins, train_labels = flat("train")
    counts = np.zeros((bins ** 3, 5))
    np.add.at(counts, (train_bins, train_labels), 1)
    val_bins, val_labels = flat("val")
    accuracy = np.mean(counts.argmax(1)[val_bins] == val_labels)
    assert 0.4 < accuracy < 0.85, (domain, accuracy)


def test_deterministic_bytes(tmp_path):
  a = demo.ensure_demo_data(str(tmp_path / "a"), **SMALL)
  b = demo.ensure_demo_data(str(tmp_path / "b"), **SMALL)
  for domain in ("street", "indoor"):
    bytes_a, bytes_b = tree_bytes(a[domain]), tree_bytes(b[domain])
    assert len(bytes_a) == 1 + 2 * (6 + 3)  # classes.txt, images, labels
    assert bytes_a == bytes_b
  other = demo.ensure_demo_data(str(tmp_path / "c"), **{**SMALL, "seed": 4})
  assert tree_bytes(other["street"]) != tree_bytes(a["street"])


def test_idempotent_and_regenerates_on_change(tmp_path):
  root = tmp_path / "demo"
  paths = demo.ensure_demo_data(str(root), **SMALL)
  image = pathlib.Path(paths["street"]) / "images" / "train" / "0000.png"
  stamp = image.stat().st_mtime_ns
  before = tree_bytes(root)
  time.sleep(0.01)
  assert demo.ensure_demo_data(str(root), **SMALL) == paths
  assert image.stat().st_mtime_ns == stamp  # not rewritten
  assert tree_bytes(root) == before

  demo.ensure_demo_data(str(root), **{**SMALL, "num_train": 4})
  assert len(os.listdir(pathlib.Path(paths["indoor"]) / "images" / "train")) == 4
  assert json.loads((root / demo.META_FILE).read_text())["num_train"] == 4

  # An interrupted generation (no metadata) is redone.
  os.remove(root / demo.META_FILE)
  os.remove(pathlib.Path(paths["street"]) / "labels" / "val" / "0001.png")
  demo.ensure_demo_data(str(root), **SMALL)
  assert tree_bytes(root) == before
  # A lost file with the metadata intact is noticed too.
  os.remove(image)
  demo.ensure_demo_data(str(root), **SMALL)
  assert tree_bytes(root) == before
  assert not [p for p in os.listdir(root) if p.startswith(".demo-tmp-")]


def test_bad_parameters(tmp_path):
  with pytest.raises(ValueError, match="num_train"):
    demo.ensure_demo_data(str(tmp_path), num_train=0)
  with pytest.raises(ValueError, match="size"):
    demo.ensure_demo_data(str(tmp_path), size=(8, 8))
  with pytest.raises(ValueError, match="seed"):
    demo.ensure_demo_data(str(tmp_path), seed=-1)
