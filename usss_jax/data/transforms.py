"""Training/eval augmentation on NumPy arrays (PIL for resampling).

All randomness comes from the `np.random.Generator` passed in, so a transform is
a pure function of (example, generator state). Images are [H, W, 3] uint8 until
`normalize`; labels are [H, W] integer train ids and are only ever resampled
with nearest neighbour, cropped, padded with the ignore value or flipped, so
their values are preserved exactly.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
from PIL import Image

from usss_jax.data import strong_augment
from usss_jax.data.base import IGNORE_LABEL

# torchvision / fyu-drn ImageNet statistics, RGB order, for [0, 1] inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("imagenet", "none")


def _resize_label(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  h, w = size_hw
  if label.shape == (h, w):
    return label
  if label.min(initial=0) < 0 or label.max(initial=0) > 255:
    raise ValueError(f"label values must be in [0, 255] to resize, got range "
                     f"[{label.min()}, {label.max()}]")
  im = Image.fromarray(label.astype(np.uint8))
  return np.asarray(im.resize((w, h), Image.Resampling.NEAREST)).astype(label.dtype)


def resize(image: np.ndarray, label: np.ndarray | None,
           size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
  """Resizes to `size_hw` = (H, W): bilinear image, nearest-neighbour label.

  Args:
    image: [H, W, 3] uint8.
    label: [H, W] integer train ids, or None.
  Returns:
    ([h, w, 3] uint8, [h, w] same dtype as label or None).
  """
  h, w = int(size_hw[0]), int(size_hw[1])
  if h <= 0 or w <= 0:
    raise ValueError(f"resize target must be positive, got {size_hw}")
  if image.shape[:2] != (h, w):
    # PIL bilinear (antialiased when shrinking), as torchvision's Resize on PIL images.
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
  if label is not None:
    label = _resize_label(label, (h, w))
  return image, label


def random_scale(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
                 scale_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray | None]:
  """Resizes by a factor drawn uniformly from `scale_range` (same factor for H and W)."""
  lo, hi = float(scale_range[0]), float(scale_range[1])
  if not 0 < lo <= hi:
    raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
  scale = rng.uniform(lo, hi)
  h, w = image.shape[:2]
  size_hw = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
  return resize(image, label, size_hw)


def random_crop(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
                crop_hw: tuple[int, int], ignore_label: int = IGNORE_LABEL
                ) -> tuple[np.ndarray, np.ndarray | None]:
  """Crops a random `crop_hw` window; pads first (bottom/right) when too small.

  Padding uses 0 for the image and `ignore_label` for the label, so padded
  pixels never count in the loss.
  """
  ch, cw = int(crop_hw[0]), int(crop_hw[1])
  h, w = image.shape[:2]
  pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    if label is not None:
      label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_label)
    h, w = image.shape[:2]
  y0 = int(rng.integers(0, h - ch + 1))
  x0 = int(rng.integers(0, w - cw + 1))
  image = image[y0:y0 + ch, x0:x0 + cw]
  if label is not None:
    label = label[y0:y0 + ch, x0:x0 + cw]
  return image, label


def random_flip(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray | None]:
  """Horizontal flip with probability 0.5."""
  if rng.random() < 0.5:
    image = image[:, ::-1]
    if label is not None:
      label = label[:, ::-1]
  return image, label


def normalize(image_uint8: np.ndarray, mode: str) -> np.ndarray:
  """[H, W, 3] uint8 -> [H, W, 3] float32.

  mode "imagenet": (x/255 - mean) / std; "none": x/255 (the reference fed
  ToTensor output without mean/std normalisation).
  """
  x = np.asarray(image_uint8, dtype=np.float32) * np.float32(1.0 / 255.0)
  if mode == "none":
    return x
  if mode == "imagenet":
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    inv_std = np.asarray([1.0 / s for s in IMAGENET_STD], np.float32)
    return (x - mean) * inv_std
  raise ValueError(f"unknown normalization {mode!r}; expected one of {NORMALIZATIONS}")


def _check_example(example: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
  image, label = example["image"], example.get("label")
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"example {example.get('key')!r}: image must be [H, W, 3] uint8, "
                     f"got {image.shape} {image.dtype}")
  if label is not None and label.shape != image.shape[:2]:
    raise ValueError(f"example {example.get('key')!r}: label shape {label.shape} != "
                     f"image shape {image.shape[:2]}")
  return image, label


def _finish(image: np.ndarray, label: np.ndarray | None, normalization: str) -> dict:
  out = {"image": np.ascontiguousarray(normalize(image, normalization))}
  if label is not None:
    out["label"] = np.ascontiguousarray(label, dtype=np.int32)
  return out


def train_crop(example: dict[str, Any], rng: np.random.Generator, *,
               crop_hw: tuple[int, int] | None,
               scale_range: tuple[float, float] = (1.0, 1.0),
               resize_hw: tuple[int, int] | None = None, flip: bool = True,
               ignore_label: int = IGNORE_LABEL) -> tuple[np.ndarray, np.ndarray | None]:
  """resize -> random scale -> random crop -> random flip, before normalisation.

  Args:
    example: {"image": [H, W, 3] uint8, "label": [H, W] int (optional), ...}.
    rng: source of all randomness.
    crop_hw: output size (H, W); None = no crop (sizes must then agree for batching).
    scale_range: uniform scale factor range; (1, 1) = off.
    resize_hw: fixed (H, W) resize applied first (the reference resized CS/IDD
      to 512x1024 before a 512x512 crop, CamVid/SUN to 360x480 / 480x640).
  Returns:
    (image [h, w, 3] uint8, label [h, w] or None).
  """
  image, label = _check_example(example)
  if resize_hw is not None:
    image, label = resize(image, label, resize_hw)
  if tuple(scale_range) != (1.0, 1.0):
    image, label = random_scale(image, label, rng, scale_range)
  if crop_hw is not None:
    image, label = random_crop(image, label, rng, crop_hw, ignore_label)
  if flip:
    image, label = random_flip(image, label, rng)
  return image, label


def train_transform(example: dict[str, Any], rng: np.random.Generator, *,
                    normalization: str = "imagenet", **crop_options) -> dict[str, np.ndarray]:
  """`train_crop`, then normalisation.

  Returns:
    {"image": [h, w, 3] float32, "label": [h, w] int32 (if the example has one)}.
  """
  return _finish(*train_crop(example, rng, **crop_options), normalization)


def eval_transform(example: dict[str, Any], *, resize_hw: tuple[int, int] | None = None,
                   normalization: str = "imagenet") -> dict[str, np.ndarray]:
  """Deterministic counterpart: optional resize (nearest label) and normalise."""
  image, label = _check_example(example)
  if resize_hw is not None:
    image, label = resize(image, label, resize_hw)
  return _finish(image, label, normalization)


class LoadAndAugment:
  """Picklable `(Example, rng) -> arrays` map for grain's `random_map`.

  With `strong` (unlabeled streams of consistency methods) it returns the weak view "image",
  its strong view "strong" (`strong_augment.photometric_strong` of the same crop), a CutMix
  box "cutmix_mask" and "valid" (not crop padding), all [h, w].

  Decoded (and `resize_hw`-resized) examples are kept in memory up to `cache_bytes`, since
  decoding dominates the input cost of small crops; the random part (scale, crop, flip)
  runs on every call. The cache is filled first come, first kept (every example is drawn
  equally often, so evicting would only churn) and is not pickled: each grain worker
  process fills its own.

  Lives here (not in pipeline.py) so that grain worker processes unpickling it
  import only NumPy/PIL and the reader, not JAX.
  """

  def __init__(self, reader, *, with_label: bool, crop_hw, resize_hw=None,
               scale_range=(1.0, 1.0), flip: bool = True, normalization: str = "imagenet",
               cache_bytes: int = 0, strong: strong_augment.StrongAugmentConfig | None = None):
    if normalization not in NORMALIZATIONS:
      raise ValueError(f"unknown normalization {normalization!r}; expected one of "
                       f"{NORMALIZATIONS}")
    self.reader = reader
    self.with_label = with_label
    self.resize_hw = tuple(resize_hw) if resize_hw else None
    self.cache_bytes = int(cache_bytes)
    if strong is not None and with_label:
      raise ValueError("strong views are for unlabeled streams (with_label=False)")
    self.strong = strong
    self.kwargs = dict(crop_hw=crop_hw, scale_range=tuple(scale_range),
                       flip=flip, normalization=normalization,
                       ignore_label=reader.spec.ignore_label)
    self._init_cache()

  def _init_cache(self) -> None:
    self._cache: dict[str, dict[str, np.ndarray]] = {}
    self._cached_bytes = 0
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    for name in ("_cache", "_cached_bytes", "_lock"):
      state.pop(name)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def _decoded(self, example) -> dict[str, np.ndarray]:
    """{"image", "label"?} of `example` after `resize_hw`, from the cache when possible."""
    cached = self._cache.get(example.key)
    if cached is not None:
      return cached
    loaded = self.reader.load_example(example)
    if self.with_label and "label" not in loaded:
      raise ValueError(f"{example.image_path}: example {example.key!r} is in a labeled "
                       "stream but has no label")
    image, label = _check_example(loaded)
    if self.resize_hw is not None:
      image, label = resize(image, label, self.resize_hw)
    decoded = {"image": image} if label is None else {"image": image, "label": label}
    size = sum(a.nbytes for a in decoded.values())
    with self._lock:
      if self._cached_bytes + size <= self.cache_bytes and example.key not in self._cache:
        self._cache[example.key] = decoded
        self._cached_bytes += size
    return decoded

  def __call__(self, example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if not self.with_label and example.label_path is not None:
      # Unlabeled stream: never decode the label (the reference decoded and dropped it).
      example = dataclasses.replace(example, label_path=None)
    decoded = self._decoded(example)
    if self.strong is None:
      return train_transform(decoded, rng, **self.kwargs)
    # Weak and strong views of one crop; "valid" marks the pixels that are not crop padding
    # (cropped like a label that is 0 everywhere and padded with ignore).
    normalization = self.kwargs["normalization"]
    crop_options = {k: v for k, v in self.kwargs.items() if k != "normalization"}
    image, footprint = train_crop(
        {"image": decoded["image"], "label": np.zeros(decoded["image"].shape[:2], np.uint8)},
        rng, **crop_options)
    strong = strong_augment.photometric_strong(image, rng, self.strong)
    return {"image": normalize(image, normalization),
            "strong": normalize(strong, normalization),
            "cutmix_mask": strong_augment.cutmix_box(*image.shape[:2], rng, self.strong),
            "valid": footprint != self.kwargs["ignore_label"]}
