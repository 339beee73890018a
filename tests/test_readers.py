"""Dataset readers on the real samples in ../shared/data and on small on-disk layouts."""

import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from usss_jax import data
from usss_jax.data import camvid, cityscapes, folder, idd, sunrgbd
from usss_jax.data.base import DataError

# --------------------------------------------------------------------------- helpers


def write_png(path, array, mode=None):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array), mode).save(path)
  return path


def rgb(h, w, value=0):
  return np.full((h, w, 3), value, np.uint8)


def label(h, w, values):
  """[h, w] uint8 cycling through `values`, so every value occurs."""
  flat = np.resize(np.asarray(values, np.uint8), h * w)
  return flat.reshape(h, w)


def decoded_values(reader, examples):
  values = set()
  for ex in examples:
    values |= set(np.unique(reader.load_example(ex)["label"]).tolist())
  return values


# --------------------------------------------------------------------------- registry


def test_registry_names_and_reexports():
  assert sorted(data.READERS) == ["camvid", "cityscapes", "folder", "idd", "idd_lite",
                                  "sunrgbd", "sunrgbd13", "tfds"]
  assert data.READERS["camvid"] is camvid.CamVidReader
  assert issubclass(data.DataError, ValueError)
  for cls in data.READERS.values():
    assert issubclass(cls, data.DatasetReader)


def test_registry_unknown_name_lists_known(tmp_path):
  with pytest.raises(ValueError, match=r"unknown dataset 'kitti'.*camvid.*sunrgbd13"):
    data.get_reader("kitti", str(tmp_path))


def test_registry_unknown_option(tmp_path):
  with pytest.raises(ValueError, match=r"no option\(s\) \['colour'\].*list_suffix"):
    data.get_reader("camvid", str(tmp_path), colour=1)


def test_missing_root_names_folder(tmp_path):
  missing = tmp_path / "nowhere"
  for name in data.READERS:
    with pytest.raises(DataError, match=str(missing)):
      data.get_reader(name, str(missing))


# --------------------------------------------------------------------------- real samples


def test_camvid_subset_counts_and_pairing(shared_data_dir):
  reader = data.get_reader("camvid", str(shared_data_dir / "camvid"), list_suffix=".subset")
  assert reader.splits() == ["test", "train", "val"]
  counts = {s: len(reader.list_examples(s)) for s in ("train", "val", "test")}
  assert counts == {"train": 92, "val": 26, "test": 47}
  for split in ("train", "val", "test"):
    examples = reader.list_examples(split)
    keys = [ex.key for ex in examples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for ex in examples:
      assert os.path.basename(ex.image_path) == os.path.basename(ex.label_path) == ex.key + ".png"
      assert pathlib.Path(ex.image_path).parent.name == split
      assert pathlib.Path(ex.label_path).parent.name == split + "annot"
  # The first line of train.subset.txt is /SegNet/CamVid/train/0001TP_006690.png ...
  first = reader.list_examples("train")[0]
  assert first.key == "0001TP_006690"
  assert first.image_path == str(shared_data_dir / "camvid" / "train" / "0001TP_006690.png")


def test_camvid_glob_mode_matches_subset_lists(shared_data_dir):
  root = str(shared_data_dir / "camvid")
  listed = data.get_reader("camvid", root, list_suffix=".subset")
  globbed = data.get_reader("camvid", root, list_suffix=None)
  for split in ("train", "val", "test"):
    assert globbed.list_examples(split) == listed.list_examples(split)


def test_camvid_full_list_names_absent_file(shared_data_dir):
  reader = data.get_reader("camvid", str(shared_data_dir / "camvid"))  # train.txt, 367 lines
  with pytest.raises(DataError, match=r"camvid/train(annot)?/\w+\.png: listed in "
                                      r".*train\.txt:\d+ but absent"):
    reader.list_examples("train")
  lenient = data.get_reader("camvid", str(shared_data_dir / "camvid"), skip_unpaired=True)
  assert len(lenient.list_examples("train")) == 92
  # 367 - 92 listed pairs are absent, image and label each.
  assert len(lenient.skipped["train"]) == 2 * (367 - 92)


def test_camvid_train_label_values_and_fractions(shared_data_dir):
  reader = data.get_reader("camvid", str(shared_data_dir / "camvid"), list_suffix=".subset")
  examples = reader.list_examples("train")
  histogram = np.zeros(256, np.int64)
  for ex in examples:
    loaded = reader.load_example(ex)
    assert loaded["image"].shape == (360, 480, 3) and loaded["image"].dtype == np.uint8
    assert loaded["label"].shape == (360, 480) and loaded["label"].dtype == np.uint8
    histogram += np.bincount(loaded["label"].ravel(), minlength=256)
  present = set(np.flatnonzero(histogram).tolist())
  assert present <= set(range(11)) | {255}
  fractions = histogram / histogram.sum()
  # PROVENANCE.md: train sky .169, road .317, void .038 (void 11 -> 255).
  np.testing.assert_allclose(fractions[[0, 3, 255]], [0.169, 0.317, 0.038], atol=6e-4)
  assert histogram[11] == 0


def test_camvid_decode_maps_void_to_ignore(tmp_path):
  root = tmp_path / "CamVid"
  write_png(root / "val" / "a.png", rgb(4, 6))
  write_png(root / "valannot" / "a.png", label(4, 6, [0, 10, 11, 3]))
  reader = data.get_reader("camvid", str(root), list_suffix=None)
  decoded = reader.load_example(reader.list_examples("val")[0])["label"]
  np.testing.assert_array_equal(decoded, label(4, 6, [0, 10, 255, 3]))
  write_png(root / "valannot" / "a.png", label(4, 6, [0, 12]))
  with pytest.raises(DataError, match=r"valannot/a\.png: label values \[12\] are outside"):
    reader.load_example(reader.list_examples("val")[0])


def test_camvid_list_with_mismatched_names(tmp_path):
  root = tmp_path / "CamVid"
  write_png(root / "val" / "a.png", rgb(4, 6))
  write_png(root / "valannot" / "b.png", label(4, 6, [0]))
  (root / "val.txt").write_text("/SegNet/CamVid/val/a.png /SegNet/CamVid/valannot/b.png\n")
  reader = data.get_reader("camvid", str(root))
  with pytest.raises(DataError, match=r"val\.txt:1: image .*a\.png and label .*b\.png"):
    reader.list_examples("val")


def test_idd_lite_counts_pairing_and_values(shared_data_dir):
  reader = data.get_reader("idd_lite", str(shared_data_dir / "idd_lite"))
  assert reader.splits() == ["train", "val"]
  assert reader.spec.num_classes == 7
  train, val = reader.list_examples("train"), reader.list_examples("val")
  assert (len(train), len(val)) == (1403, 204)
  for ex in train + val:
    seq, frame = ex.key.split("/")
    assert ex.image_path.endswith(f"/{seq}/{frame}_image.jpg")
    assert ex.label_path.endswith(f"/{seq}/{frame}_label.png")
  assert [ex.key for ex in val] == sorted(ex.key for ex in val)
  some = val[::41]  # 5 spread-out frames; decoding all is not needed.
  for ex in some:
    loaded = reader.load_example(ex)
    assert loaded["image"].shape == (227, 320, 3)
    assert loaded["label"].shape == (227, 320)
  assert decoded_values(reader, some) <= set(range(7)) | {255}


def test_cityscapes_label_ids_to_train_ids(shared_data_dir):
  reader = data.get_reader("cityscapes", str(shared_data_dir / "cityscapes"))
  assert reader.splits() == ["train"]
  examples = reader.list_examples("train")
  assert [ex.key for ex in examples] == [f"aachen/aachen_00000{i}_000019" for i in range(4)]
  assert all(ex.label_path.endswith("_gtFine_labelIds.png") for ex in examples)
  # Independent reference: the table of PROVENANCE.md as a dict.
  train_id = dict(zip([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33],
                      range(19)))
  ignored = total = 0
  for ex in examples:
    loaded = reader.load_example(ex)
    assert loaded["image"].shape == (1024, 2048, 3)
    raw = np.asarray(Image.open(ex.label_path))
    expected = np.full(raw.shape, 255, np.uint8)
    for label_id, tid in train_id.items():
      expected[raw == label_id] = tid
    np.testing.assert_array_equal(loaded["label"], expected)
    ignored += int((loaded["label"] == 255).sum())
    total += loaded["label"].size
  assert 0.060 < ignored / total < 0.070  # PROVENANCE.md: about 6.5 %.


def test_sunrgbd_values(shared_data_dir):
  reader = data.get_reader("sunrgbd", str(shared_data_dir / "sunrgbd"))
  assert reader.splits() == ["test", "train"]
  assert reader.spec.num_classes == 37 and reader.spec.classes[36] == "bag"
  expected = {"train": {0, 1, 2, 4, 6, 7, 8, 10, 15, 25, 34, 36, 255},
              "test": {0, 1, 3, 16, 17, 18, 21, 31, 34, 255}}
  for split, values in expected.items():
    (ex,) = reader.list_examples(split)
    assert ex.key == "00000001"
    assert ex.image_path.endswith(f"image/{split}/img-000001.jpg")
    assert ex.label_path.endswith(f"semseg-label37/{split}/00000001.png")
    loaded = reader.load_example(ex)
    assert loaded["image"].shape == (530, 730, 3)
    assert set(np.unique(loaded["label"]).tolist()) == values


def test_sunrgbd13_groups_the_37_classes(shared_data_dir):
  root = str(shared_data_dir / "sunrgbd")
  r37, r13 = data.get_reader("sunrgbd", root), data.get_reader("sunrgbd13", root)
  assert r13.spec.classes == ("bed", "books", "ceiling", "chair", "floor", "furniture",
                              "objects", "painting", "sofa", "table", "tv", "wall", "window")
  # A few rows of the standard NYU 40 -> 13 map written out by name.
  by_name = {"wall": "wall", "door": "wall", "floor mat": "floor", "blinds": "window",
             "curtain": "window", "desk": "table", "night stand": "furniture",
             "television": "tv", "picture": "painting", "pillow": "objects", "bag": "objects"}
  for c37, c13 in by_name.items():
    assert r13.spec.classes[sunrgbd.CLASS13_OF_CLASS37[r37.spec.classes.index(c37)]] == c13
  table = np.append(np.asarray(sunrgbd.CLASS13_OF_CLASS37), 255)
  for split in ("train", "test"):
    (ex,) = r37.list_examples(split)
    l37 = r37.load_example(ex)["label"].astype(np.int64)
    l13 = r13.load_example(ex)["label"]
    np.testing.assert_array_equal(l13, table[np.where(l37 == 255, 37, l37)])
  assert sorted(set(sunrgbd.CLASS13_OF_CLASS37)) == list(range(13))


# --------------------------------------------------------------------------- synthetic layouts


def make_cityscapes(root, frames, kinds):
  for frame in frames:
    write_png(root / "leftImg8bit/train/bonn" / f"{frame}_leftImg8bit.png", rgb(4, 6))
    for kind, values in kinds.items():
      write_png(root / "gtFine/train/bonn" / f"{frame}_gtFine_{kind}.png", label(4, 6, values))
    write_png(root / "gtFine/train/bonn" / f"{frame}_gtFine_color.png", rgb(4, 6))


def test_cityscapes_label_train_ids_variant(tmp_path):
  root = tmp_path / "cs"
  make_cityscapes(root, ["bonn_000000_000019"], {"labelTrainIds": [0, 18, 255, 5]})
  make_cityscapes(root, ["bonn_000001_000019"],
                  {"labelIds": [7, 33, 0, 17], "labelTrainIds": [1, 1, 1, 1]})
  reader = data.get_reader("cityscapes", str(root))
  first, second = reader.list_examples("train")
  assert first.label_path.endswith("bonn_000000_000019_gtFine_labelTrainIds.png")
  assert second.label_path.endswith("bonn_000001_000019_gtFine_labelIds.png")  # preferred
  np.testing.assert_array_equal(reader.load_example(first)["label"], label(4, 6, [0, 18, 255, 5]))
  np.testing.assert_array_equal(reader.load_example(second)["label"], label(4, 6, [0, 18, 255, 5]))
  only_train_ids = data.get_reader("cityscapes", str(root), label_type="labelTrainIds")
  ex = only_train_ids.list_examples("train")[1]
  np.testing.assert_array_equal(only_train_ids.load_example(ex)["label"], np.ones((4, 6)))
  only_ids = data.get_reader("cityscapes", str(root), label_type="labelIds")
  with pytest.raises(DataError, match=r"bonn_000000_000019_leftImg8bit\.png: image has no label"):
    only_ids.list_examples("train")


def test_cityscapes_bad_values(tmp_path):
  root = tmp_path / "cs"
  make_cityscapes(root, ["bonn_000000_000019"], {"labelTrainIds": [0, 19]})
  make_cityscapes(root, ["bonn_000001_000019"], {"labelIds": [7, 34]})
  reader = data.get_reader("cityscapes", str(root))
  first, second = reader.list_examples("train")
  with pytest.raises(DataError,
                     match=r"000000_000019_gtFine_labelTrainIds\.png: label values \[19\]"):
    reader.load_example(first)
  with pytest.raises(DataError, match=r"000001_000019_gtFine_labelIds\.png: label values \[34\]"):
    reader.load_example(second)


def test_idd_level3_layout(tmp_path):
  root = tmp_path / "idd"
  for seq, frame in [("201", "frame0199"), ("0", "frame0001")]:
    write_png(root / "leftImg8bit/val" / seq / f"{frame}_leftImg8bit.png", rgb(5, 7))
    write_png(root / "gtFine/val" / seq / f"{frame}_gtFine_labellevel3Ids.png",
              label(5, 7, [0, 25, 255, 13]))
    write_png(root / "gtFine/val" / seq / f"{frame}_gtFine_labelcsIds.png", label(5, 7, [99]))
  reader = data.get_reader("idd", str(root))
  assert reader.spec.num_classes == 26 and reader.spec.classes[25] == "sky"
  examples = reader.list_examples("val")
  assert [ex.key for ex in examples] == ["0/frame0001", "201/frame0199"]
  for ex in examples:
    assert os.path.dirname(ex.image_path).endswith(ex.key.split("/")[0])
    np.testing.assert_array_equal(reader.load_example(ex)["label"], label(5, 7, [0, 25, 255, 13]))
  bad = write_png(root / "gtFine/val/0/frame0001_gtFine_labellevel3Ids.png", label(5, 7, [26]))
  with pytest.raises(DataError, match=f"{bad}: label values \\[26\\]"):
    reader.load_example(examples[0])


def test_sunrgbd_label38_encoding(tmp_path):
  root = tmp_path / "sun"
  write_png(root / "image/train/img-000002.jpg", rgb(6, 8))
  write_png(root / "image/train/img-000010.jpg", rgb(6, 8))
  write_png(root / "semseg-label38/train/00000002.png", label(6, 8, [0, 1, 37, 22]))
  write_png(root / "semseg-label38/train/00000010.png", label(6, 8, [38]))
  reader = data.get_reader("sunrgbd", str(root), label_encoding="label38")
  good, bad = reader.list_examples("train")
  assert (good.key, bad.key) == ("00000002", "00000010")
  np.testing.assert_array_equal(reader.load_example(good)["label"], label(6, 8, [255, 0, 36, 21]))
  with pytest.raises(DataError, match=r"00000010\.png: label values \[38\]"):
    reader.load_example(bad)
  r13 = data.get_reader("sunrgbd13", str(root), label_encoding="label38")
  # 1 wall -> wall (11), 37 bag -> objects (6), 22 ceiling -> ceiling (2).
  np.testing.assert_array_equal(r13.load_example(good)["label"], label(6, 8, [255, 11, 6, 2]))
  with pytest.raises(ValueError, match="label_encoding"):
    data.get_reader("sunrgbd", str(root), label_encoding="label40")


def make_folder(root, classes_text, pairs):
  """pairs: relative key -> (image array, label array, image suffix)."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "classes.txt").write_text(classes_text)
  for key, (image, lab, suffix) in pairs.items():
    write_png(root / "images" / f"{key}{suffix}", image)
    if lab is not None:
      write_png(root / "labels" / f"{key}.png", lab)


def test_folder_pairs_by_relative_path(tmp_path):
  root = tmp_path / "mydata"
  # Same file name in two sub-folders, and image listing order (a/, b/) differs
  # from the key of the content: each label must go with its own image.
  make_folder(root, "# comment\nroad 128 64 128\n\nsky\nlevel 2\n", {
      "train/b/x": (rgb(4, 6, 20), label(4, 6, [1]), ".jpg"),
      "train/a/x": (rgb(4, 6, 10), label(4, 6, [0, 255]), ".png"),
      "train/c/deep/y": (rgb(4, 6, 30), label(4, 6, [2]), ".jpeg"),
  })
  reader = data.get_reader("folder", str(root))
  assert reader.spec.name == "mydata"
  assert reader.spec.classes == ("road", "sky", "level 2")
  assert reader.spec.palette[0] == (128, 64, 128)
  assert len(set(reader.spec.palette)) == 3
  assert reader.splits() == ["train"]
  examples = reader.list_examples("train")
  assert [ex.key for ex in examples] == ["a/x", "b/x", "c/deep/y"]
  expected_label = {"a/x": {0, 255}, "b/x": {1}, "c/deep/y": {2}}
  for ex in examples:
    loaded = reader.load_example(ex)
    assert set(np.unique(loaded["label"]).tolist()) == expected_label[ex.key]
  assert examples[1].image_path.endswith("images/train/b/x.jpg")
  named = data.get_reader("folder", str(root), spec_name="roads")
  assert named.spec.name == "roads"


def test_folder_value_outside_class_map(tmp_path):
  root = tmp_path / "d"
  make_folder(root, "a\nb\n", {"val/0": (rgb(3, 3), label(3, 3, [0, 2]), ".png")})
  reader = data.get_reader("folder", str(root))
  (ex,) = reader.list_examples("val")
  with pytest.raises(DataError, match=r"labels/val/0\.png: label values \[2\] are outside"):
    reader.load_example(ex)


@pytest.mark.parametrize("text, match", [
    ("", ": no classes listed"),
    ("a 1 2\n", r":1: expected `name` or `name r g b`"),
    ("a\nb 0 0 300\n", r":2: colour \(0, 0, 300\) is outside"),
    ("a\na\n", r":2: class 'a' is listed twice"),
])
def test_folder_bad_classes_file(tmp_path, text, match):
  root = tmp_path / "d"
  make_folder(root, text, {})
  with pytest.raises(DataError, match=str(root / "classes.txt") + match):
    data.get_reader("folder", str(root))


def test_folder_missing_classes_file(tmp_path):
  (tmp_path / "d").mkdir()
  with pytest.raises(DataError, match=r"d/classes\.txt: classes file does not exist"):
    data.get_reader("folder", str(tmp_path / "d"))


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small_folder(tmp_path):
  root = tmp_path / "d"
  make_folder(root, "a\nb\n", {
      "train/0": (rgb(4, 6), label(4, 6, [0, 1]), ".png"),
      "train/1": (rgb(4, 6), label(4, 6, [1]), ".png"),
  })
  return root


def test_missing_split_folder(small_folder):
  reader = data.get_reader("folder", str(small_folder))
  with pytest.raises(DataError, match=f"{small_folder}/images/val: missing folder"):
    reader.list_examples("val")
  (small_folder / "images" / "val").mkdir()
  with pytest.raises(DataError, match=f"{small_folder}/labels/val: missing folder"):
    reader.list_examples("val")


@pytest.mark.parametrize("name, kwargs, image_rel, label_rel", [
    ("folder", {}, "images/train/x.png", "labels/train/x.png"),
    ("camvid", {"list_suffix": None}, "train/x.png", "trainannot/x.png"),
    ("cityscapes", {}, "leftImg8bit/train/c/x_leftImg8bit.png",
     "gtFine/train/c/x_gtFine_labelIds.png"),
    ("idd", {}, "leftImg8bit/train/0/x_leftImg8bit.png",
     "gtFine/train/0/x_gtFine_labellevel3Ids.png"),
    ("idd_lite", {}, "leftImg8bit/train/0/x_image.jpg", "gtFine/train/0/x_label.png"),
    ("sunrgbd", {}, "image/train/img-000001.jpg", "semseg-label37/train/00000001.png"),
])
def test_unpaired_files_every_reader(tmp_path, name, kwargs, image_rel, label_rel):
  """One good pair, then an image without label, then a label without image."""
  root = tmp_path / name
  if name == "folder":
    root.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
  write_png(root / image_rel, rgb(4, 6))
  write_png(root / label_rel, label(4, 6, [0]))
  reader = data.get_reader(name, str(root), **kwargs)
  assert reader.splits() == ["train"]
  (good,) = reader.list_examples("train")
  assert reader.load_example(good)["label"].shape == (4, 6)

  def renamed(rel):
    return rel.replace("x_", "y_").replace("/x.", "/y.").replace("000001", "000002")

  lonely_image = write_png(root / renamed(image_rel), rgb(4, 6))
  with pytest.raises(DataError, match=f"{lonely_image}: image has no label"):
    reader.list_examples("train")
  os.remove(lonely_image)
  lonely_label = write_png(root / renamed(label_rel), label(4, 6, [0]))
  with pytest.raises(DataError, match=f"{lonely_label}: label has no image"):
    reader.list_examples("train")
  write_png(root / renamed(image_rel).replace("y", "z").replace("000002", "000003"), rgb(4, 6))
  lenient = data.get_reader(name, str(root), skip_unpaired=True, **kwargs)
  assert [ex.key for ex in lenient.list_examples("train")] == [good.key]
  assert len(lenient.skipped["train"]) == 2
  assert str(lonely_label) in lenient.skipped["train"]


def test_truncated_image(small_folder):
  path = small_folder / "images/train/0.png"
  write_png(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
  blob = path.read_bytes()
  path.write_bytes(blob[:len(blob) // 2])
  write_png(small_folder / "labels/train/0.png", label(64, 64, [0]))
  reader = data.get_reader("folder", str(small_folder))
  with pytest.raises(DataError, match=f"{path}: unreadable or truncated image"):
    reader.load_example(reader.list_examples("train")[0])


def test_size_mismatch(small_folder):
  write_png(small_folder / "labels/train/1.png", label(5, 6, [0]))
  reader = data.get_reader("folder", str(small_folder))
  with pytest.raises(DataError, match=r"labels/train/1\.png: label size 6x5 \(WxH\) does not "
                                      r"match image .*images/train/1\.png size 6x4"):
    reader.load_example(reader.list_examples("train")[1])


def test_colour_coded_label_rejected_and_grey_rgb_label_read(small_folder):
  coloured = rgb(4, 6, 1)
  coloured[1, 2] = (10, 20, 30)
  path = write_png(small_folder / "labels/train/1.png", coloured)
  reader = data.get_reader("folder", str(small_folder))
  with pytest.raises(DataError, match=re.escape(
      f"{path}: label image of mode 'RGB' with e.g. colour (10, 20, 30)")):
    reader.load_example(reader.list_examples("train")[1])
  write_png(path, rgb(4, 6, 1))  # a grayscale label saved as RGB: the ids are its channel
  assert (reader.load_example(reader.list_examples("train")[1])["label"] == 1).all()


def test_ambiguous_keys(small_folder):
  write_png(small_folder / "images/train/1.jpg", rgb(4, 6))
  reader = data.get_reader("folder", str(small_folder))
  with pytest.raises(DataError, match=r"images/train/1\.(jpg|png): same key '1' as"):
    reader.list_examples("train")


def test_identity_lut_and_palette_helpers():
  lut = folder.identity_lut(3)
  assert lut[:3].tolist() == [0, 1, 2] and lut[255] == 255 and lut[3] == -1
  palette = folder.bit_palette(8)
  assert palette[0] == (0, 0, 0) and palette[1] == (128, 0, 0) and palette[2] == (0, 128, 0)
  assert len(set(folder.bit_palette(256))) == 256
  assert len(cityscapes.PALETTE) == 19 and len(idd.LEVEL3_PALETTE) == 26
  assert len(camvid.PALETTE) == 11 and len(sunrgbd.PALETTE13) == 13
