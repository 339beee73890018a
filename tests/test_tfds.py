"""TFDS array_record builders: TF-free prepare, key-matched reads, grain, TrainInput."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from PIL import Image

from usss_jax.data import pipeline, tfds_builders, tfds_reader
from usss_jax.data.base import DataError, DatasetReader, DatasetSpec, Example, load_label_png
from usss_jax.data.registry import get_reader
from usss_jax.domains import Domain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_folder_dataset(root):
  """Folder layout with RGB PNGs, one JPEG and one palette PNG (re-encoded path)."""
  rng = np.random.default_rng(0)
  (root / "classes.txt").write_text("road\ncar\nsky 0 0 200\n")
  for split, n in (("train", 7), ("val", 2)):
    os.makedirs(root / "images" / split / "seq")
    os.makedirs(root / "labels" / split / "seq")
    for i in range(n):
      h, w = 10 + i, 14
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      label = rng.choice([0, 1, 2, 255], size=(h, w)).astype(np.uint8)
      stem = root / "images" / split / "seq" / f"f{i}"
      if i == 1:
        Image.fromarray(image).save(f"{stem}.jpg", quality=90)
      elif i == 2:
        Image.fromarray(image).convert("P", palette=Image.Palette.ADAPTIVE).save(f"{stem}.png")
      else:
        Image.fromarray(image).save(f"{stem}.png")
      Image.fromarray(label).save(root / "labels" / split / "seq" / f"f{i}.png")


_PREPARE_SCRIPT = textwrap.dedent("""
    import json, sys
    from usss_jax.data import tfds_builders, tfds_reader
    path = tfds_builders.prepare("folder", sys.argv[1], sys.argv[2], config_name="tiny_folder")
    reader = tfds_reader.TfdsReader(path)
    for ex in reader.list_examples("train"):
      reader.load_example(ex)
    print(json.dumps({"path": path, "tensorflow": "tensorflow" in sys.modules,
                      "splits": reader.splits()}))
""")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(folder root, prepared dataset dir); prepared in a fresh TF-free process."""
  root = tmp_path_factory.mktemp("folder_ds")
  _write_folder_dataset(root)
  data_dir = tmp_path_factory.mktemp("tfds")
  proc = subprocess.run([sys.executable, "-c", _PREPARE_SCRIPT, str(root), str(data_dir)],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["tensorflow"] is False
  assert result["splits"] == ["train", "val"]
  return str(root), result["path"]


def test_round_trip_matches_reader_by_key(prepared):
  root, path = prepared
  assert path == tfds_reader.dataset_dir(os.path.dirname(os.path.dirname(
      os.path.dirname(path))), "tiny_folder")
  src_reader = get_reader("folder", root)
  tf_reader = tfds_reader.TfdsReader(path)
  assert tf_reader.spec.classes == ("road", "car", "sky")
  assert tf_reader.spec.palette == src_reader.spec.palette
  for split in ("train", "val"):
    originals = src_reader.list_examples(split)
    served = tf_reader.list_examples(split)
    assert [e.key for e in served] == [e.key for e in originals]
    for a, b in zip(originals, served):
      x, y = src_reader.load_example(a), tf_reader.load_example(b)
      assert x["key"] == y["key"]
      assert y["image"].dtype == np.uint8 and y["label"].dtype == np.uint8
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])


def test_records_are_in_hash_order_and_found_by_key(prepared):
  _, path = prepared
  src = tfds_reader.TfdsExamples(path, "train")
  assert sorted(src.keys) == [f"seq/f{i}" for i in range(7)]
  assert src.keys != sorted(src.keys)  # array_record order is not generation order
  for key in ("seq/f0", "seq/f5"):
    assert src[src.index_of(key)]["key"] == key
  with pytest.raises(DataError, match="no example 'seq/nope'"):
    src.index_of("seq/nope")
  # Without the keys file (dataset prepared elsewhere) the keys are scanned.
  os.rename(os.path.join(path, "keys.val.json"), os.path.join(path, "keys.val.bak"))
  try:
    assert sorted(tfds_reader.TfdsExamples(path, "val").keys) == ["seq/f0", "seq/f1"]
  finally:
    os.rename(os.path.join(path, "keys.val.bak"), os.path.join(path, "keys.val.json"))


def test_tfds_examples_as_grain_source(prepared):
  root, path = prepared
  reader = get_reader("folder", root)
  expected = {ex.key: reader.load_example(ex)["label"].astype(np.int64).sum()
              for ex in reader.list_examples("train")}
  ds = (grain.MapDataset.source(tfds_reader.TfdsExamples(path, "train"))
        .map(lambda r: (r["key"], int(r["label"].astype(np.int64).sum())))
        .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
  assert dict(ds) == expected


def test_train_input_from_tfds_equals_folder(prepared):
  root, path = prepared
  batches = []
  for reader in (get_reader("folder", root), tfds_reader.TfdsReader(path)):
    exs = reader.list_examples("train")
    domain = Domain("d", reader, labeled=exs[:4], unlabeled=exs[4:], crop_hw=(8, 8))
    it = pipeline.TrainInput([domain], labeled_batch=2, unlabeled_batch=2, seed=0, mesh=None)
    batches.append([next(it) for _ in range(3)])
  for a, b in zip(*batches):
    for kind in ("labeled", "unlabeled"):
      for name in a["d"][kind]:
        np.testing.assert_array_equal(a["d"][kind][name], b["d"][kind][name])


class _MixedReader(DatasetReader):
  """Two labelled examples and one without a label."""

  spec = DatasetSpec("mixed", ("a", "b"), ((1, 2, 3), (4, 5, 6)))

  def splits(self):
    return ["train"]

  def list_examples(self, split):
    p = lambda n: os.path.join(self.root, n)
    return [Example("x0", p("x0.png"), p("x0_l.png")), Example("x1", p("x1.png"), p("x1_l.png")),
            Example("x2", p("x2.png"))]

  def decode_label(self, path):
    return load_label_png(path).astype(np.uint8)


def test_unlabelled_examples_and_custom_reader(tmp_path):
  for i in range(3):
    Image.fromarray(np.full((4, 6, 3), 40 * i, np.uint8)).save(tmp_path / f"x{i}.png")
    Image.fromarray(np.full((4, 6), i % 2, np.uint8)).save(tmp_path / f"x{i}_l.png")
  reader = _MixedReader(str(tmp_path))
  path = tfds_builders.prepare("mixed", str(tmp_path), str(tmp_path / "tfds"), reader=reader)
  assert os.path.basename(os.path.dirname(path)).startswith("mixed_")  # custom config
  tf_reader = tfds_reader.TfdsReader(path)
  assert tf_reader.spec == reader.spec
  exs = tf_reader.list_examples("train")
  assert [e.label_path is None for e in exs] == [False, False, True]
  assert "label" not in tf_reader.load_example(exs[2])
  np.testing.assert_array_equal(tf_reader.load_example(exs[1])["label"], np.ones((4, 6)))
  np.testing.assert_array_equal(tf_reader.load_example(exs[2])["image"],
                                np.full((4, 6, 3), 80, np.uint8))
  with pytest.raises(DataError, match="no split 'val'"):
    tf_reader.list_examples("val")


def test_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    tfds_builders.prepare("folder", str(tmp_path / "missing"), str(tmp_path / "out"))
  with pytest.raises(DataError, match="not a prepared TFDS dataset"):
    tfds_reader.TfdsReader(str(tmp_path))


def test_real_camvid_val_round_trip(shared_data_dir, tmp_path):
  root = str(shared_data_dir / "camvid")
  path = tfds_builders.prepare("camvid", root, str(tmp_path), splits=("val",),
                               list_suffix=".subset")
  reader = get_reader("camvid", root, list_suffix=".subset")
  tf_reader = tfds_reader.TfdsReader(path)
  assert tf_reader.spec == reader.spec and tf_reader.splits() == ["val"]
  originals = reader.list_examples("val")
  served = tf_reader.list_examples("val")
  assert len(served) == len(originals) == 26
  for a, b in list(zip(originals, served))[::8]:
    x, y = reader.load_example(a), tf_reader.load_example(b)
    assert a.key == b.key
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_reader_options_get_their_own_config(prepared, tmp_path):
  root, _ = prepared
  path = tfds_builders.prepare("folder", root, str(tmp_path), splits=("val",),
                               spec_name="streetish")
  assert os.path.basename(os.path.dirname(path)).startswith("folder_")
  tf_reader = tfds_reader.TfdsReader(path)
  assert tf_reader.spec.name == "streetish" and tf_reader.splits() == ["val"]
  with pytest.raises(ValueError, match="reserved"):
    tfds_builders.prepare("folder", root, str(tmp_path), config_name="folder", spec_name="x")
