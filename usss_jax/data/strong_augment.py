"""Strong views for weak-to-strong consistency (FixMatch / UniMatch style).

An unlabeled image is cropped and flipped once (the *weak* view, `transforms.train_crop`);
its *strong* view is the same crop with photometric noise only, so every pixel of the strong
view sits where it sits in the weak view and the weak view's pseudo-label applies to it:

  colour jitter (p `color_jitter_p`: brightness, contrast, saturation, hue in a random order,
  torchvision's ColorJitter on PIL images) -> grayscale (p `grayscale_p`) -> Gaussian blur
  (p `blur_p`, sigma ~ U(blur_sigma)).

CutMix mixes two examples, so the pipeline only draws each unlabeled image's box
(`cutmix_box`) and the train step pastes the partner's pixels and pseudo-labels on device
(`losses.cutmix`). Every call draws the same number of values from the generator whatever
fires, so later draws do not depend on which ops fired: views are a pure function of the
image and the generator's state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class StrongAugmentConfig:
  """Parameters of the strong view (defaults: UniMatch's).

  Attributes:
    color_jitter_p: probability of colour jitter.
    brightness, contrast, saturation: jitter strength b; the factor is drawn from
      U[max(0, 1 - b), 1 + b] (0 = op off).
    hue: strength h in [0, 0.5]; the hue shift is drawn from U[-h, h] of a full turn.
    grayscale_p: probability of converting to (3-channel) grayscale.
    blur_p: probability of a Gaussian blur; blur_sigma its (low, high) sigma in pixels.
    cutmix_p: probability that an image gets a CutMix box.
    cutmix_area: (low, high) box area as a fraction of the image.
    cutmix_aspect: (low, high) box aspect ratio height / width, drawn log-uniformly.
  """
  color_jitter_p: float = 0.8
  brightness: float = 0.5
  contrast: float = 0.5
  saturation: float = 0.5
  hue: float = 0.25
  grayscale_p: float = 0.2
  blur_p: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  cutmix_p: float = 0.5
  cutmix_area: tuple[float, float] = (0.02, 0.4)
  cutmix_aspect: tuple[float, float] = (0.3, 1 / 0.3)

  def __post_init__(self):
    for name in ("color_jitter_p", "grayscale_p", "blur_p", "cutmix_p"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
    if not 0.0 <= self.hue <= 0.5:
      raise ValueError(f"hue={self.hue} must be in [0, 0.5]")
    for name, low_ok in (("blur_sigma", 0.0), ("cutmix_area", 0.0), ("cutmix_aspect", 0.0)):
      lo, hi = (float(v) for v in getattr(self, name))
      if not low_ok < lo <= hi:
        raise ValueError(f"{name}={getattr(self, name)} must be a (low, high) pair with "
                         "0 < low <= high")
      object.__setattr__(self, name, (lo, hi))
    if self.cutmix_area[1] > 1:
      raise ValueError(f"cutmix_area={self.cutmix_area} must lie in (0, 1]")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> StrongAugmentConfig:
    """From a dict or ConfigDict; missing keys keep their defaults, unknown keys are errors."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown strong-augmentation key(s) {unknown}; expected some of "
                       f"{sorted(known)}")
    return cls(**values)


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
  """Rotates the hue by `shift` of a full turn (torchvision's PIL adjust_hue)."""
  if image.mode == "L":
    return image
  h, s, v = image.convert("HSV").split()
  hue = (np.asarray(h, np.int16) + int(round(shift * 255))) % 256
  return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


def _jitter(image: Image.Image, op: str, factor: float) -> Image.Image:
  if op == "hue":
    return adjust_hue(image, factor)
  enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
              "saturation": ImageEnhance.Color}[op]
  return enhancer(image).enhance(factor)


def photometric_strong(image: np.ndarray, rng: np.random.Generator,
                       cfg: StrongAugmentConfig = StrongAugmentConfig()) -> np.ndarray:
  """Strong photometric view of one crop: [H, W, 3] uint8 -> [H, W, 3] uint8 (new array).

  Draws 10 values from `rng` whatever fires: 3 gates, the op order (4), the factors (4)
  and sigma are drawn first, then applied.
  """
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.dtype} {image.shape}")
  gates = rng.random(3)
  order = rng.permutation(len(JITTER_OPS))
  u = rng.random(len(JITTER_OPS))
  sigma = float(rng.uniform(*cfg.blur_sigma))
  strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
  factors = [max(0.0, 1.0 - b) + ui * (1.0 + b - max(0.0, 1.0 - b))
             for b, ui in zip(strengths, u)] + [cfg.hue * (2.0 * u[3] - 1.0)]
  out = Image.fromarray(image)
  if gates[0] < cfg.color_jitter_p:
    for i in order:
      # torchvision skips an op whose strength is 0 (its factor would be the identity).
      if (strengths + (cfg.hue,))[i] > 0:
        out = _jitter(out, JITTER_OPS[i], factors[i])
  if gates[1] < cfg.grayscale_p:
    out = out.convert("L")
  if gates[2] < cfg.blur_p:
    out = out.filter(ImageFilter.GaussianBlur(radius=sigma))
  return np.array(out.convert("RGB"), np.uint8)


def cutmix_box(height: int, width: int, rng: np.random.Generator,
               cfg: StrongAugmentConfig = StrongAugmentConfig()) -> np.ndarray:
  """Random CutMix box mask [H, W] bool (True: take the partner's pixel); 5 draws.

  With probability cfg.cutmix_p: area fraction a ~ U(cfg.cutmix_area), aspect ratio
  r = h / w ~ exp(U(log cfg.cutmix_aspect)); a side longer than the image is clipped and
  the other stretched to keep the area; the box lies inside the image, its position
  uniform. Otherwise all False.
  """
  u = rng.random(5)
  mask = np.zeros((height, width), bool)
  if not u[0] < cfg.cutmix_p:
    return mask
  area = (cfg.cutmix_area[0] + (cfg.cutmix_area[1] - cfg.cutmix_area[0]) * u[1]) * height * width
  log_lo, log_hi = (math.log(v) for v in cfg.cutmix_aspect)
  ratio = math.exp(log_lo + (log_hi - log_lo) * u[2])
  h, w = math.sqrt(area * ratio), math.sqrt(area / ratio)
  if h > height:
    h, w = height, area / height
  elif w > width:
    h, w = area / width, width
  h, w = min(max(round(h), 1), height), min(max(round(w), 1), width)
  y0 = min(int(u[3] * (height - h + 1)), height - h)
  x0 = min(int(u[4] * (width - w + 1)), width - w)
  mask[y0:y0 + h, x0:x0 + w] = True
  return mask
