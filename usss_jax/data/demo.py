"""A small procedurally generated two-domain dataset, written on first use.

Two domains in the `folder` layout (readable with `get_reader("folder", path)`):

  street: sky, building, road, vegetation, car (+ 255 on void image borders)
  indoor: ceiling, wall, floor, furniture, window

Both share one scene structure, so that a shared encoder has something to
transfer: a bright smooth top band (sky / ceiling), a textured middle (building
facades with window grids or vegetation / wallpaper with windows), a flat bottom
(road with lane marks / floor with planks) and objects standing on it (cars with
wheels and a cabin / furniture on legs). Corresponding classes have similar
colour and texture statistics. Per image, the layout, the object colours, the
texture phases and a global colour cast are random, so colour alone does not
determine the class (car bodies take any colour, windows look like the sky,
building and road greys overlap); position and texture do.

Generation is bit-deterministic for a seed: it draws only uniform numbers from
a PCG64 stream per image and uses only elementwise +, -, *, / and comparisons
(no transcendental functions, whose last bit may vary between CPUs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
from PIL import Image

from usss_jax import files

# Bump when the generator changes, so existing demo folders are regenerated.
GENERATOR_VERSION = 1
META_FILE = "demo_meta.json"
IGNORE = 255

STREET_CLASSES = (("sky", (70, 130, 180)), ("building", (70, 70, 70)),
                  ("road", (128, 64, 128)), ("vegetation", (107, 142, 35)),
                  ("car", (0, 0, 142)))
INDOOR_CLASSES = (("ceiling", (200, 200, 120)), ("wall", (150, 100, 60)),
                  ("floor", (80, 60, 180)), ("furniture", (200, 40, 40)),
                  ("window", (40, 200, 200)))
SKY, BUILDING, ROAD, VEGETATION, CAR = range(5)
CEILING, WALL, FLOOR, FURNITURE, WINDOW = range(5)
DOMAINS = ("street", "indoor")


def _uniform(rng: np.random.Generator, low: float, high: float, shape=None):
  return low + (high - low) * rng.random(shape)


def _jitter(rng: np.random.Generator, rgb, spread: float) -> np.ndarray:
  """[3] colour: a common brightness shift plus a smaller per-channel one."""
  return (np.asarray(rgb, np.float64) + _uniform(rng, -spread, spread)
          + _uniform(rng, -spread / 3, spread / 3, 3))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
  """[h, w] noise in [-1, 1], bilinearly interpolated from a grid of `cell` px."""
  grid = _uniform(rng, -1.0, 1.0, (h // cell + 2, w // cell + 2))
  ys, xs = np.arange(h) / cell, np.arange(w) / cell
  y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _fine_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """[h, w] white noise in [-1, 1]."""
  return _uniform(rng, -1.0, 1.0, (h, w))


def _paint(image, label, mask, color, class_id, texture=None):
  """Fills `mask` ([H, W] bool) with `color` ([3]) + `texture` ([H, W] or [H, W, 3])."""
  value = np.broadcast_to(np.asarray(color, np.float64), image.shape).copy()
  if texture is not None:
    value += texture[..., None] if texture.ndim == 2 else texture
  image[mask] = value[mask]
  label[mask] = class_id


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  return np.arange(h)[:, None], np.arange(w)[None, :]


def _street(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """One street scene -> ([H, W, 3] float image, [H, W] uint8 label)."""
  yy, xx = _grid(h, w)
  image = np.zeros((h, w, 3))
  label = np.zeros((h, w), np.uint8)

  # Sky: bright, brighter towards the top, soft clouds.
  sky = _jitter(rng, (150, 180, 215), 25)
  gradient = (0.25 * (1 - yy / h)) * np.ones((1, w))
  texture = (gradient[..., None] * sky + 10 * _smooth_noise(rng, h, w, 24)[..., None]
             + 2 * _fine_noise(rng, h, w)[..., None])
  _paint(image, label, np.ones((h, w), bool), sky, SKY, texture)

  # Skyline of building blocks and trees down to the ground line.
  ground = int(_uniform(rng, 0.55, 0.72) * h)
  x = -int(rng.integers(0, 12))
  while x < w:
    width = int(rng.integers(12, 36))
    top = int(_uniform(rng, 0.12, 0.9) * (ground - 0.1 * h))
    columns = (xx >= x) & (xx < x + width)
    if rng.random() < 0.7:  # Building facade with a grid of windows.
      grey = _uniform(rng, 70, 160)
      color = _jitter(rng, (grey, grey * 0.97, grey * 0.93), 10)
      period_y, period_x = int(rng.integers(6, 10)), int(rng.integers(6, 10))
      windows = ((((yy - top) % period_y) >= 2) & (((yy - top) % period_y) < 5)
                 & (((xx - x) % period_x) >= 2) & (((xx - x) % period_x) < 5))
      shade = _uniform(rng, -45, 35)
      texture = windows * shade + 5 * _fine_noise(rng, h, w)
      _paint(image, label, columns & (yy >= top) & (yy < ground), color, BUILDING,
             texture)
    else:  # Tree crowns: bumpy top, strong high-frequency green texture.
      color = _jitter(rng, (75, 115, 50), 20)
      bumps = 5 * _smooth_noise(rng, 1, w, 6)
      texture = (22 * _fine_noise(rng, h, w) + 12 * _smooth_noise(rng, h, w, 4))
      _paint(image, label, columns & (yy >= top + bumps) & (yy < ground), color,
             VEGETATION, texture)
    x += width

  # Road: flat grey with little noise and a dashed lane mark.
  road = _jitter(rng, (90, 90, 95), 20)
  texture = 3 * _fine_noise(rng, h, w)
  lane_y = ground + int((h - ground) * _uniform(rng, 0.4, 0.7))
  dash, phase = int(rng.integers(8, 14)), int(rng.integers(0, 14))
  lane = (yy >= lane_y) & (yy < lane_y + 2) & (((xx + phase) % (2 * dash)) < dash)
  texture = texture + lane * 120
  _paint(image, label, (yy >= ground) * np.ones((1, w), bool), road, ROAD, texture)

  # Cars: any body colour, dark glass cabin, dark wheels.
  for _ in range(int(rng.integers(1, 4))):
    car_w, car_h = int(rng.integers(16, 34)), int(rng.integers(9, 16))
    bottom = int(rng.integers(ground + 3, h + 1))
    left = int(rng.integers(-car_w // 3, w - car_w // 2))
    top = bottom - car_h
    cabin_top = top
    body_top = top + car_h * 2 // 5
    inset = car_w // 5
    body = (yy >= body_top) & (yy < bottom) & (xx >= left) & (xx < left + car_w)
    cabin = ((yy >= cabin_top) & (yy < body_top) & (xx >= left + inset)
             & (xx < left + car_w - inset))
    color = _uniform(rng, 20, 235, 3)
    texture = 4 * _fine_noise(rng, h, w)
    _paint(image, label, body, color, CAR, texture)
    _paint(image, label, cabin, _jitter(rng, (55, 65, 75), 10), CAR, texture)
    wheel_top = bottom - max(3, car_h // 4)
    for wheel_x in (left + 2, left + car_w - 6):
      wheel = (yy >= wheel_top) & (yy < bottom) & (xx >= wheel_x) & (xx < wheel_x + 4)
      _paint(image, label, wheel, (28, 28, 30), CAR, texture)

  # Void borders (like rectification borders / the ego vehicle).
  if rng.random() < 0.6:
    b_left, b_right = int(rng.integers(0, 4)), int(rng.integers(0, 4))
    b_bottom = int(rng.integers(1, 6))
    void = (xx < b_left) | (xx >= w - b_right) | (yy >= h - b_bottom)
    _paint(image, label, void, (8, 8, 8), IGNORE, 6 * _fine_noise(rng, h, w))
  return image, label


def _indoor(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """One indoor scene -> ([H, W, 3] float image, [H, W] uint8 label)."""
  yy, xx = _grid(h, w)
  image = np.zeros((h, w, 3))
  label = np.zeros((h, w), np.uint8)
  centred = xx - w / 2

  # Ceiling: bright and smooth with a soft light falloff, slanted edge.
  ceiling_y = _uniform(rng, 0.15, 0.32) * h + _uniform(rng, -0.15, 0.15) * centred
  ceiling = _jitter(rng, (205, 200, 190), 25)
  gradient = (0.2 * (1 - yy / h)) * np.ones((1, w))
  texture = (gradient[..., None] * ceiling + 8 * _smooth_noise(rng, h, w, 24)[..., None]
             + 2 * _fine_noise(rng, h, w)[..., None])
  _paint(image, label, yy < ceiling_y, ceiling, CEILING, texture)

  # Wall: mid-tone with striped wallpaper texture.
  floor_y = _uniform(rng, 0.58, 0.75) * h + _uniform(rng, -0.12, 0.12) * centred
  tone = _uniform(rng, 95, 175)
  wall = _jitter(rng, (tone, tone * _uniform(rng, 0.9, 1.05), tone * _uniform(rng, 0.85, 1.0)),
                 12)
  period = int(rng.integers(5, 9))
  stripes = ((xx + int(rng.integers(0, 9))) % period < period // 2) * _uniform(rng, -18, 18)
  texture = stripes * np.ones((h, 1)) + 5 * _fine_noise(rng, h, w)
  _paint(image, label, (yy >= ceiling_y) & (yy < floor_y), wall, WALL, texture)

  # Windows in the wall: sky-like panes with a darker frame cross.
  for _ in range(int(rng.integers(0, 3))):
    win_w, win_h = int(rng.integers(12, 28)), int(rng.integers(10, 22))
    left = int(rng.integers(0, w - win_w))
    top = int(_uniform(rng, 0.2, 0.45) * h)
    pane = (yy >= top) & (yy < top + win_h) & (xx >= left) & (xx < left + win_w)
    frame = ((yy == top + win_h // 2) | (xx == left + win_w // 2) | (yy == top)
             | (yy == top + win_h - 1) | (xx == left) | (xx == left + win_w - 1))
    sky = _jitter(rng, (165, 190, 220), 25)
    texture = (frame * -90.0)[..., None] + 6 * _smooth_noise(rng, h, w, 8)[..., None]
    _paint(image, label, pane & (yy < floor_y), sky, WINDOW, texture)

  # Floor: flat with faint plank lines.
  floor = _jitter(rng, (125, 100, 80), 25)
  plank = int(rng.integers(4, 7))
  texture = ((yy % plank) == 0) * -15.0 + 3 * _fine_noise(rng, h, w)
  _paint(image, label, yy >= floor_y, floor, FLOOR, texture)

  # Furniture on legs, any colour, lighter top surface.
  for _ in range(int(rng.integers(1, 4))):
    f_w, f_h = int(rng.integers(14, 40)), int(rng.integers(12, 30))
    bottom = int(rng.integers(int(0.72 * h), h + 1))
    left = int(rng.integers(-f_w // 3, w - f_w // 2))
    top = bottom - f_h
    leg_top = bottom - max(3, f_h // 4)
    inside = (xx >= left) & (xx < left + f_w)
    body = inside & (yy >= top) & (yy < leg_top)
    legs = (((xx >= left) & (xx < left + 3)) | ((xx >= left + f_w - 3) & (xx < left + f_w)))
    legs = legs & (yy >= leg_top) & (yy < bottom)
    color = _uniform(rng, 20, 235, 3)
    texture = ((yy < top + 3) * 35.0)[..., None] + 4 * _fine_noise(rng, h, w)[..., None]
    _paint(image, label, body, color, FURNITURE, texture)
    _paint(image, label, legs, color * 0.5, FURNITURE, texture)
  return image, label


_GENERATORS = {"street": _street, "indoor": _indoor}


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
  """Global colour cast and contrast, then rounding to [H, W, 3] uint8."""
  gain = _uniform(rng, 0.8, 1.2) * _uniform(rng, 0.9, 1.1, 3)
  offset = _uniform(rng, -15, 15, 3)
  image = image * gain + offset
  return np.rint(np.clip(image, 0, 255)).astype(np.uint8)


def generate_example(domain: str, split_index: int, index: int, size: tuple[int, int],
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """One scene -> ([H, W, 3] uint8 image, [H, W] uint8 label)."""
  rng = np.random.default_rng([seed, DOMAINS.index(domain), split_index, index])
  image, label = _GENERATORS[domain](rng, *size)
  return _finish(rng, image), label


def _write_domain(out_dir: str, domain: str, counts: dict[str, int],
                  size: tuple[int, int], seed: int) -> None:
  classes = STREET_CLASSES if domain == "street" else INDOOR_CLASSES
  os.makedirs(out_dir)
  with open(os.path.join(out_dir, "classes.txt"), "w", encoding="utf-8") as f:
    for name, (r, g, b) in classes:
      f.write(f"{name} {r} {g} {b}\n")
  for split_index, (split, count) in enumerate(counts.items()):
    image_dir = os.path.join(out_dir, "images", split)
    label_dir = os.path.join(out_dir, "labels", split)
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    for i in range(count):
      image, label = generate_example(domain, split_index, i, size, seed)
      # compress_level fixed (and low: speed) so bytes do not depend on defaults.
      Image.fromarray(image, "RGB").save(os.path.join(image_dir, f"{i:04d}.png"),
                                         compress_level=1)
      Image.fromarray(label, "L").save(os.path.join(label_dir, f"{i:04d}.png"),
                                       compress_level=1)


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
  """Serialises generation between processes sharing `root` (POSIX only)."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  with open(os.path.join(root, ".demo.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _read_meta(root: str) -> dict | None:
  try:
    with open(os.path.join(root, META_FILE), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _is_complete(paths: dict[str, str], counts: dict[str, int]) -> bool:
  """Cheap check that no split folder lost or gained files since generation."""
  for path in paths.values():
    for split, count in counts.items():
      for kind in ("images", "labels"):
        try:
          if len(os.listdir(os.path.join(path, kind, split))) != count:
            return False
        except OSError:
          return False
  return True


def ensure_demo_data(root: str, *, num_train: int = 48, num_val: int = 16,
                     size: tuple[int, int] = (96, 128), seed: int = 0,
                     force: bool = False) -> dict[str, str]:
  """Writes the demo dataset under `root` unless it is already there.

  Args:
    root: folder for the demo data (created; `street/` and `indoor/` inside it
      are owned by this function and replaced when regenerating).
    num_train, num_val: images per split and domain.
    size: (height, width) of every image.
    seed: generation seed.
    force: regenerate even when up to date.
  Returns:
    {"street": <root>/street, "indoor": <root>/indoor}.

  Idempotent: `<root>/demo_meta.json` records the parameters and is written
  last, so an interrupted generation is redone; other parameters, or a split
  folder with a wrong file count, cause a regeneration. Data is generated in a
  temporary folder inside `root` and moved into place.
  """
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  if num_train < 1 or num_val < 0:
    raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
  height, width = (int(v) for v in size)
  if height < 32 or width < 32:
    raise ValueError(f"size must be at least (32, 32), got {size}")
  root = os.path.abspath(os.path.expanduser(root))
  paths = {domain: os.path.join(root, domain) for domain in DOMAINS}
  meta = {"generator_version": GENERATOR_VERSION, "num_train": int(num_train),
          "num_val": int(num_val), "size": [height, width], "seed": int(seed)}
  counts = {"train": int(num_train), "val": int(num_val)}
  os.makedirs(root, exist_ok=True)
  with _locked(root):
    if not force and _read_meta(root) == meta and _is_complete(paths, counts):
      return paths
    tmp = tempfile.mkdtemp(prefix=".demo-tmp-", dir=root)
    try:
      for domain in DOMAINS:
        _write_domain(os.path.join(tmp, domain), domain, counts, (height, width), seed)
      # Invalidate first: a crash between the moves below leaves no marker.
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(root, META_FILE))
      for domain, path in paths.items():
        if os.path.lexists(path):
          os.rename(path, os.path.join(tmp, f"old-{domain}"))
        os.rename(os.path.join(tmp, domain), path)
      files.write_json(os.path.join(root, META_FILE), meta)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return paths
