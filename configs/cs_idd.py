"""Cityscapes (19) + IDD level-3 (26): the paper's recipe (512x512 crops).

"configs/cs_idd.py:consistency" trains with the recommended method instead (docs/RESULTS.md).
"""

from usss_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.domain_names = ("cityscapes", "idd")
  c.domains.cityscapes = config_lib.domain("cityscapes", config_lib.dataset_root("cityscapes"),
                                           crop=(512, 512), resize=(512, 1024))
  c.domains.idd = config_lib.domain("idd", config_lib.dataset_root("idd"),
                                    crop=(512, 512), resize=(512, 1024))
  c.total_steps = 60000
  return config_lib.paper_variant(c, arg, "configs/cs_idd.py")
