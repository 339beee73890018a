"""usss-jax: universal semi-supervised semantic segmentation in JAX/Flax.

  from usss_jax import Segmenter, losses
  segmenter = Segmenter.from_workdir("runs/demo")
  mask = segmenter.predict("street.png", domain="street")
"""

import importlib

from usss_jax import losses

__version__ = "0.2.0"
__all__ = ["Segmenter", "losses"]


def __getattr__(name: str):
  """`usss_jax.Segmenter`, loaded on first use: importing the package stays light, and
  `python -m usss_jax.convert` (a module the segmenter's imports reach) runs without runpy's
  "found in sys.modules" warning above its output."""
  if name == "Segmenter":
    return importlib.import_module("usss_jax.segmenter").Segmenter
  raise AttributeError(f"module 'usss_jax' has no attribute {name!r}")
