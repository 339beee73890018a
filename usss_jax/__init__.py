"""usss-jax: universal semi-supervised semantic segmentation in JAX/Flax.

  from usss_jax import Segmenter, losses
  segmenter = Segmenter.from_workdir("runs/demo")
  mask = segmenter.predict("street.png", domain="street")
"""

from usss_jax import losses
from usss_jax.segmenter import Segmenter

__version__ = "0.2.0"
__all__ = ["Segmenter", "losses"]
