"""Augmentation invariants: label values, alignment, padding, flips, normalisation."""

import numpy as np
import pytest
from PIL import Image

from usss_jax.data import transforms
from usss_jax.data.base import DatasetReader, DatasetSpec, Example, load_label_png


def _position_example(h, w):
  """Image channels encode (y, x); label = y * w + x, so any misalignment shows."""
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([yy, xx, (yy + xx) % 7], -1).astype(np.uint8)
  return image, (yy * w + xx).astype(np.int32)


def _decode_position(image, w):
  return image[..., 0].astype(np.int64) * w + image[..., 1]


def test_random_crop_keeps_alignment_and_varies():
  image, label = _position_example(40, 50)
  corners = set()
  for seed in range(20):
    img_c, lab_c = transforms.random_crop(image, label, np.random.default_rng(seed), (16, 24))
    assert img_c.shape == (16, 24, 3) and lab_c.shape == (16, 24)
    np.testing.assert_array_equal(_decode_position(img_c, 50), lab_c)
    corners.add(int(lab_c[0, 0]))
  assert len(corners) > 10  # offsets are random


def test_random_crop_pads_with_zero_and_ignore():
  image, label = _position_example(5, 6)
  image = image + 1  # no zero pixels in the original
  img_c, lab_c = transforms.random_crop(image, label, np.random.default_rng(0), (8, 9),
                                        ignore_label=250)
  assert img_c.shape == (8, 9, 3)
  np.testing.assert_array_equal(img_c[:5, :6], image)
  np.testing.assert_array_equal(lab_c[:5, :6], label)
  assert (img_c[5:] == 0).all() and (img_c[:, 6:] == 0).all()
  assert (lab_c[5:] == 250).all() and (lab_c[:, 6:] == 250).all()
  # Larger in one dimension only: padded in H, random offset in W.
  image, label = _position_example(4, 30)
  img_c, lab_c = transforms.random_crop(image, label, np.random.default_rng(1), (6, 10))
  assert (lab_c[4:] == 255).all()
  np.testing.assert_array_equal(_decode_position(img_c[:4], 30), lab_c[:4])


def test_random_flip_both_outcomes_aligned():
  image, label = _position_example(6, 9)
  flipped = 0
  for seed in range(16):
    img_f, lab_f = transforms.random_flip(image, label, np.random.default_rng(seed))
    np.testing.assert_array_equal(_decode_position(img_f, 9), lab_f)
    if lab_f[0, 0] == 8:
      flipped += 1
      np.testing.assert_array_equal(lab_f, label[:, ::-1])
    else:
      np.testing.assert_array_equal(lab_f, label)
  assert 0 < flipped < 16


def test_resize_nearest_label_and_bilinear_image():
  label = np.array([[0, 1], [7, 255]], np.uint8)
  image = np.full((2, 2, 3), 77, np.uint8)
  img_r, lab_r = transforms.resize(image, label, (4, 6))
  np.testing.assert_array_equal(lab_r, np.repeat(np.repeat(label, 2, 0), 3, 1))
  assert lab_r.dtype == np.uint8
  assert (img_r == 77).all() and img_r.shape == (4, 6, 3)
  # Bilinear (not nearest) on the image: a ramp gets intermediate values.
  ramp = np.tile(np.array([0, 255], np.uint8)[None, :, None], (1, 1, 3))
  img_r, _ = transforms.resize(ramp, None, (1, 8))
  assert len(np.unique(img_r)) > 2
  # Shrinking a random label keeps only existing values.
  rand = np.random.default_rng(0).choice([3, 9, 255], size=(33, 47)).astype(np.uint8)
  _, small = transforms.resize(np.zeros((33, 47, 3), np.uint8), rand, (10, 13))
  assert set(np.unique(small)) <= {3, 9, 255}


def test_random_scale_range_and_values():
  label = np.random.default_rng(0).choice([1, 4, 255], size=(20, 30)).astype(np.uint8)
  image = np.zeros((20, 30, 3), np.uint8)
  sizes = set()
  for seed in range(10):
    img_s, lab_s = transforms.random_scale(image, label, np.random.default_rng(seed), (0.5, 2.0))
    assert img_s.shape[:2] == lab_s.shape
    assert 10 <= lab_s.shape[0] <= 40
    assert abs(lab_s.shape[1] / lab_s.shape[0] - 1.5) < 0.1
    assert set(np.unique(lab_s)) <= {1, 4, 255}
    sizes.add(lab_s.shape)
  assert len(sizes) > 5
  with pytest.raises(ValueError, match="scale_range"):
    transforms.random_scale(image, label, np.random.default_rng(0), (2.0, 1.0))


def test_normalize_numbers():
  pix = np.array([[[0, 128, 255], [10, 20, 30]]], np.uint8)
  x = pix.astype(np.float64) / 255.0
  mean = np.array([0.485, 0.456, 0.406])
  std = np.array([0.229, 0.224, 0.225])
  out = transforms.normalize(pix, "imagenet")
  assert out.dtype == np.float32 and out.shape == (1, 2, 3)
  np.testing.assert_allclose(out, (x - mean) / std, rtol=0, atol=1e-6)
  np.testing.assert_allclose(out[0, 0], [-2.117904, 0.205182, 2.64], atol=1e-5)
  raw = transforms.normalize(pix, "none")
  np.testing.assert_allclose(raw, x, atol=1e-7)
  assert raw.dtype == np.float32
  with pytest.raises(ValueError, match="unknown normalization 'torch'"):
    transforms.normalize(pix, "torch")


def test_train_transform_deterministic_and_aligned():
  image, label = _position_example(30, 40)
  ex = {"key": "a", "image": image, "label": label}
  kw = dict(crop_hw=(12, 16), flip=True, normalization="none")
  a = transforms.train_transform(ex, np.random.default_rng(5), **kw)
  b = transforms.train_transform(ex, np.random.default_rng(5), **kw)
  c = transforms.train_transform(ex, np.random.default_rng(6), **kw)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["label"], c["label"])
  assert a["image"].dtype == np.float32 and a["label"].dtype == np.int32
  assert a["image"].shape == (12, 16, 3) and a["label"].shape == (12, 16)
  restored = np.rint(a["image"] * 255).astype(np.uint8)
  np.testing.assert_array_equal(_decode_position(restored, 40), a["label"])


def test_train_transform_resize_scale_crop_preserves_label_values():
  rng = np.random.default_rng(0)
  label = rng.choice([0, 2, 5, 255], size=(64, 96)).astype(np.uint8)
  image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
  for seed in range(5):
    out = transforms.train_transform({"image": image, "label": label},
                                     np.random.default_rng(seed), crop_hw=(40, 40),
                                     resize_hw=(32, 64), scale_range=(0.5, 1.5))
    assert out["image"].shape == (40, 40, 3) and out["label"].shape == (40, 40)
    assert set(np.unique(out["label"])) <= {0, 2, 5, 255}


def test_train_transform_fixed_resize_no_crop_and_unlabeled():
  image, label = _position_example(12, 20)
  out = transforms.train_transform({"image": image, "label": label}, np.random.default_rng(0),
                                   crop_hw=None, resize_hw=(12, 20), flip=False,
                                   normalization="none")
  np.testing.assert_array_equal(out["label"], label)
  np.testing.assert_allclose(out["image"], image / 255.0, atol=1e-7)
  out = transforms.train_transform({"image": image}, np.random.default_rng(0), crop_hw=(8, 8))
  assert set(out) == {"image"} and out["image"].shape == (8, 8, 3)
  with pytest.raises(ValueError, match="'bad'.*label shape"):
    transforms.train_transform({"key": "bad", "image": image, "label": label[:5]},
                               np.random.default_rng(0), crop_hw=(8, 8))


def test_eval_transform():
  image, label = _position_example(12, 20)
  out = transforms.eval_transform({"image": image, "label": label.astype(np.uint8)},
                                  resize_hw=(6, 10), normalization="none")
  # PIL nearest samples source pixel centres: output i <- input floor((i + 0.5) * 2).
  np.testing.assert_array_equal(out["label"], label.astype(np.uint8)[1::2, 1::2])
  assert out["image"].shape == (6, 10, 3) and out["image"].dtype == np.float32


class _TinyReader(DatasetReader):
  spec = DatasetSpec("tiny", ("a", "b"), ((0, 0, 0), (9, 9, 9)), ignore_label=254)

  def decode_label(self, path):
    return load_label_png(path).astype(np.uint8)


def test_load_and_augment_unlabeled_skips_label_and_uses_spec_ignore(tmp_path):
  image = np.full((4, 5, 3), 200, np.uint8)
  Image.fromarray(image).save(tmp_path / "a.png")
  Image.fromarray(np.ones((4, 5), np.uint8)).save(tmp_path / "a_label.png")
  reader = _TinyReader(str(tmp_path))
  missing = Example("a", str(tmp_path / "a.png"), str(tmp_path / "does_not_exist.png"))
  fn = transforms.LoadAndAugment(reader, with_label=False, crop_hw=(6, 6), flip=False,
                                 normalization="none")
  out = fn(missing, np.random.default_rng(0))  # the label file is never opened
  assert set(out) == {"image"} and out["image"].shape == (6, 6, 3)
  fn = transforms.LoadAndAugment(reader, with_label=True, crop_hw=(6, 6), flip=False)
  out = fn(Example("a", str(tmp_path / "a.png"), str(tmp_path / "a_label.png")),
           np.random.default_rng(0))
  assert (out["label"][:4, :5] == 1).all() and (out["label"][4:] == 254).all()
  with pytest.raises(ValueError, match="no label"):
    fn(Example("a", str(tmp_path / "a.png")), np.random.default_rng(0))
