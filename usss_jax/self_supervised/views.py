"""Two overlapping views of one unlabeled image whose encoder cells correspond exactly.

The DRN-D encoder has output stride 8 and is a stack of convolutions, so shifting its input
by a multiple of 8 pixels shifts its output by whole cells (exactly, away from the zero-padded
border). Two crops of one image taken at offsets that are multiples of 8 therefore see the
same content in known cells:

  image (after the domain's `resize`) -> random scale -> base region (crop + 8 * max_shift,
  random position, anywhere) -> optional horizontal flip of the base region -> view k = the
  crop at cell offset (y_k, x_k) in the base region, y_k in [0, max_shift_y], x_k in
  [0, max_shift_x] -> independent `strong_augment.photometric_strong` noise per view.

Offset convention: (dy, dx) = (y_2 - y_1, x_2 - x_1), so cell (i, j) of view 2 shows what
cell (i + dy, j + dx) of view 1 shows (when that cell exists).

The geometric offset matters: with two identical crops every positive pair sits at the same
absolute position, and the network can match them by where the zero padding is rather than by
what they show. Flipping the base region (its width is a multiple of 8) maps cells to cells,
so both views share one flip and the offsets stay exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from usss_jax.data import strong_augment, transforms

CELL = 8  # the encoder's output stride: one feature cell covers CELL x CELL input pixels


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """How the two views of an image are drawn.

  Attributes:
    crop_hw: (H, W) of each view, multiples of CELL.
    max_shift_cells: (sy, sx): each view's cell offset inside the base region is drawn
      uniformly from [0, sy] x [0, sx], so |dy| <= sy and |dx| <= sx, and the views overlap by
      at least (H/8 - sy) x (W/8 - sx) cells.
    scale_range: random scale of the whole image before the base region is cut (the scale is
      raised where needed so that the base region fits: no padding ever enters a view).
    flip: a random horizontal flip, the same for both views.
    strong: the photometric noise each view gets independently.
  """
  crop_hw: tuple[int, int] = (96, 128)
  max_shift_cells: tuple[int, int] = (3, 4)
  scale_range: tuple[float, float] = (0.8, 1.2)
  flip: bool = True
  strong: strong_augment.StrongAugmentConfig = strong_augment.StrongAugmentConfig()

  def __post_init__(self):
    h, w = (int(v) for v in self.crop_hw)
    if h <= 0 or w <= 0 or h % CELL or w % CELL:
      raise ValueError(f"crop_hw={self.crop_hw} must be positive multiples of {CELL}")
    sy, sx = (int(v) for v in self.max_shift_cells)
    if not (0 <= sy < h // CELL and 0 <= sx < w // CELL):
      raise ValueError(f"max_shift_cells={self.max_shift_cells} must leave the views "
                       f"overlapping: 0 <= shift < crop / {CELL} = {(h // CELL, w // CELL)}")
    lo, hi = (float(v) for v in self.scale_range)
    if not 0 < lo <= hi:
      raise ValueError(f"scale_range={self.scale_range} must satisfy 0 < low <= high")
    object.__setattr__(self, "crop_hw", (h, w))
    object.__setattr__(self, "max_shift_cells", (sy, sx))
    object.__setattr__(self, "scale_range", (lo, hi))

  @property
  def base_hw(self) -> tuple[int, int]:
    """(H, W) of the base region both views are cut from."""
    return (self.crop_hw[0] + CELL * self.max_shift_cells[0],
            self.crop_hw[1] + CELL * self.max_shift_cells[1])

  @property
  def cells_hw(self) -> tuple[int, int]:
    """(h, w) encoder cells of one view."""
    return self.crop_hw[0] // CELL, self.crop_hw[1] // CELL


def geometric_pair(image: np.ndarray, rng: np.random.Generator, cfg: ViewConfig
                   ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """The two crops before photometric noise, and their cell offset.

  Args:
    image: [H, W, 3] uint8 (the decoded training image after the domain's resize).
    rng: source of all randomness (5 draws + the flip gate, whatever the image).
  Returns:
    (view_1 [h, w, 3] uint8, view_2 [h, w, 3] uint8, (dy, dx)) with (h, w) = cfg.crop_hw and
    view_2[8i:8i+8, 8j:8j+8] == view_1[8(i+dy):8(i+dy)+8, 8(j+dx):8(j+dx)+8] wherever both
    cells exist.
  """
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.dtype} {image.shape}")
  (ch, cw), (bh, bw) = cfg.crop_hw, cfg.base_hw
  sy, sx = cfg.max_shift_cells
  h, w = image.shape[:2]
  scale = max(float(rng.uniform(*cfg.scale_range)), bh / h, bw / w)
  size = (max(bh, int(round(h * scale))), max(bw, int(round(w * scale))))
  image, _ = transforms.resize(image, None, size)
  # Base region anywhere in the scaled image (pixel precision: only the views' relative
  # position has to be whole cells).
  top = int(rng.integers(0, size[0] - bh + 1))
  left = int(rng.integers(0, size[1] - bw + 1))
  base = image[top:top + bh, left:left + bw]
  flip = rng.random() < 0.5
  if cfg.flip and flip:
    base = base[:, ::-1]
  (y1, y2), (x1, x2) = rng.integers(0, sy + 1, size=2), rng.integers(0, sx + 1, size=2)
  view_1 = base[CELL * y1:CELL * y1 + ch, CELL * x1:CELL * x1 + cw]
  view_2 = base[CELL * y2:CELL * y2 + ch, CELL * x2:CELL * x2 + cw]
  return (np.ascontiguousarray(view_1), np.ascontiguousarray(view_2),
          (int(y2 - y1), int(x2 - x1)))


def two_views(image: np.ndarray, rng: np.random.Generator, cfg: ViewConfig
              ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """`geometric_pair`, then independent photometric noise on each view.

  Returns:
    (view_1, view_2, (dy, dx)): two [h, w, 3] uint8 views and their cell offset.
  """
  view_1, view_2, offset = geometric_pair(image, rng, cfg)
  return (strong_augment.photometric_strong(view_1, rng, cfg.strong),
          strong_augment.photometric_strong(view_2, rng, cfg.strong), offset)
