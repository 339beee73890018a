"""Strong views of unlabeled images (weak-to-strong consistency) and CutMix alignment."""

import colorsys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from usss_jax import losses
from usss_jax.data import strong_augment as sa

OFF = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _image(seed=0, h=24, w=32):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _luma(image):
  return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_same_seed_same_view_and_fixed_number_of_draws():
  image, cfg = _image(), sa.StrongAugmentConfig()
  views = [sa.photometric_strong(image, np.random.default_rng(3), cfg) for _ in range(2)]
  np.testing.assert_array_equal(*views)
  assert not np.array_equal(views[0], sa.photometric_strong(image, np.random.default_rng(4), cfg))
  # Whatever fires, the view consumes 10 draws and the box 5: the next draw is the 16th.
  for p in (0.0, 1.0):
    rng = np.random.default_rng(7)
    cfg = sa.StrongAugmentConfig(color_jitter_p=p, grayscale_p=p, blur_p=p, cutmix_p=p)
    sa.photometric_strong(image, rng, cfg)
    sa.cutmix_box(24, 32, rng, cfg)
    assert rng.random() == np.random.default_rng(7).random(16)[-1]


def test_all_probabilities_zero_is_the_identity():
  image = _image()
  out = sa.photometric_strong(image, np.random.default_rng(0), sa.StrongAugmentConfig(**OFF))
  np.testing.assert_array_equal(out, image)
  assert out is not image and out.dtype == np.uint8


def test_grayscale_is_the_luma_on_three_equal_channels():
  image = _image(1)
  cfg = sa.StrongAugmentConfig(**{**OFF, "grayscale_p": 1.0})
  out = sa.photometric_strong(image, np.random.default_rng(0), cfg)
  assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
  assert np.max(np.abs(out[..., 0] - _luma(image))) <= 0.51  # PIL rounds to nearest


@pytest.mark.parametrize("op, factor", [("brightness", 0.6), ("brightness", 1.4),
                                        ("contrast", 0.5), ("contrast", 1.5),
                                        ("saturation", 0.3), ("saturation", 1.7)])
def test_jitter_ops_match_float64_blends(op, factor):
  """torchvision's ColorJitter on PIL images: blend with black / the mean grey / the luma."""
  image = _image(2)
  x = image.astype(np.float64)
  if op == "brightness":
    other = np.zeros_like(x)
  elif op == "contrast":
    other = np.full_like(x, int(_luma(image).mean() + 0.5))
  else:
    other = np.repeat(np.round(_luma(image))[..., None], 3, axis=-1)
  want = np.clip(other + factor * (x - other), 0, 255)
  got = sa._jitter(Image.fromarray(image), op, factor)
  assert np.max(np.abs(np.asarray(got, np.float64) - want)) <= 1.0


def test_hue_shift_matches_colorsys_and_zero_is_the_identity():
  image = _image(3, 8, 8)
  err = np.abs(np.asarray(sa.adjust_hue(Image.fromarray(image), 0.0), np.int16) - image)
  assert err.max() <= 6 and err.mean() < 1.0  # PIL's 8-bit HSV round trip
  red = np.zeros((2, 2, 3), np.uint8)
  red[..., 0] = 255
  green = np.asarray(sa.adjust_hue(Image.fromarray(red), 1 / 3))
  assert tuple(green[0, 0]) == tuple(round(255 * v) for v in colorsys.hsv_to_rgb(1 / 3, 1, 1))
  gray = np.full((2, 2, 3), 90, np.uint8)
  np.testing.assert_array_equal(np.asarray(sa.adjust_hue(Image.fromarray(gray), 0.3)), gray)


def test_blur_keeps_the_mean_and_lowers_the_variance():
  image = _image(4, 64, 64)
  cfg = sa.StrongAugmentConfig(**{**OFF, "blur_p": 1.0, "blur_sigma": (1.5, 1.5)})
  out = sa.photometric_strong(image, np.random.default_rng(0), cfg).astype(np.float64)
  assert abs(out.mean() - image.mean()) < 1.5
  assert out.var() < 0.2 * image.astype(np.float64).var()


def test_cutmix_boxes_respect_area_and_aspect_bounds():
  cfg = sa.StrongAugmentConfig(cutmix_p=1.0)
  rng = np.random.default_rng(0)
  fractions = []
  for _ in range(400):
    mask = sa.cutmix_box(60, 80, rng, cfg)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert mask.sum() == h * w  # one filled rectangle inside the image
    fractions.append(mask.mean())
  fractions = np.asarray(fractions)
  assert fractions.min() >= 0.015 and fractions.max() <= 0.42  # (0.02, 0.4) up to rounding
  assert 0.17 < fractions.mean() < 0.25  # uniform area: mean 0.21
  assert not sa.cutmix_box(60, 80, rng, sa.StrongAugmentConfig(cutmix_p=0.0)).any()


def _numpy_cutmix(x, masks, partner):
  m = masks.reshape(masks.shape + (1,) * (x.ndim - 3))
  return np.where(m, x[partner], x)


def test_device_cutmix_keeps_images_and_labels_aligned():
  """Each image's pixels encode its index; labels = index: after mixing they still agree."""
  b, h, w = 4, 12, 16
  images = np.broadcast_to(np.arange(b, dtype=np.float32)[:, None, None, None],
                           (b, h, w, 3)).copy()
  labels = np.broadcast_to(np.arange(b, dtype=np.int32)[:, None, None], (b, h, w)).copy()
  rng = np.random.default_rng(1)
  masks = np.stack([sa.cutmix_box(h, w, rng, sa.StrongAugmentConfig(cutmix_p=1.0))
                    for _ in range(b)])
  partner = np.roll(np.arange(b), -1)
  mixed_images = np.asarray(losses.cutmix(jnp.asarray(images), jnp.asarray(masks), partner))
  mixed_labels = np.asarray(losses.cutmix(jnp.asarray(labels), jnp.asarray(masks), partner))
  np.testing.assert_array_equal(mixed_images, _numpy_cutmix(images, masks, partner))
  np.testing.assert_array_equal(mixed_images[..., 0], mixed_labels)
  np.testing.assert_array_equal(mixed_labels[~masks], labels[~masks])
  assert np.all(mixed_labels[masks] == np.broadcast_to(partner[:, None, None], masks.shape)[masks])


def test_config_rejects_unknown_keys_and_bad_values():
  with pytest.raises(ValueError, match="blurr_p"):
    sa.StrongAugmentConfig.from_dict({"blurr_p": 0.5})
  with pytest.raises(ValueError, match="grayscale_p"):
    sa.StrongAugmentConfig(grayscale_p=1.5)
  assert sa.StrongAugmentConfig.from_dict({"hue": 0.1}).hue == 0.1
