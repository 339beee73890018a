"""Cityscapes (19) + IDD level-3 (26): the paper's recipe (512x512 crops).

"configs/cs_idd.py:consistency" trains with the recommended method instead (docs/RESULTS.md).
"""

import os

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.domain_names = ("cityscapes", "idd")
  c.domains.cityscapes = common.domain("cityscapes", os.path.join(common.DATA_ROOT, "cityscapes"),
                                       crop=(512, 512), resize=(512, 1024))
  c.domains.idd = common.domain("idd", os.path.join(common.DATA_ROOT, "idd"),
                                crop=(512, 512), resize=(512, 1024))
  c.total_steps = 60000
  return common.paper_variant(c, arg, "configs/cs_idd.py")
