"""Cityscapes (19) + CamVid (11): the paper's recipe (crops 512x512 and 360x480).

"configs/cs_camvid.py:consistency" trains with the recommended method instead (docs/RESULTS.md).
"""

from usss_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.domain_names = ("cityscapes", "camvid")
  c.domains.cityscapes = config_lib.domain("cityscapes", config_lib.dataset_root("cityscapes"),
                                           crop=(512, 512), resize=(512, 1024))
  c.domains.camvid = config_lib.domain("camvid", config_lib.dataset_root("camvid"),
                                       crop=(360, 480), eval_split="test")
  c.total_steps = 60000
  return config_lib.paper_variant(c, arg, "configs/cs_camvid.py")
