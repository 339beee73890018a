"""Cityscapes (19 classes) + SUN RGB-D (13-class version): the paper's outdoor/indoor pair.

"configs/cs_sun.py:consistency" trains with the recommended method instead (docs/RESULTS.md).
"""

from usss_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.domain_names = ("cityscapes", "sun")
  c.domains.cityscapes = config_lib.domain("cityscapes", config_lib.dataset_root("cityscapes"),
                                           crop=(512, 512), resize=(512, 1024))
  c.domains.sun = config_lib.domain("sunrgbd13", config_lib.dataset_root("sunrgbd"),
                                    crop=(480, 640), eval_split="test", resize=(480, 640))
  c.total_steps = 60000
  return config_lib.paper_variant(c, arg, "configs/cs_sun.py")
