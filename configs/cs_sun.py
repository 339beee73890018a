"""Cityscapes (19 classes) + SUN RGB-D (13-class version): the paper's outdoor/indoor pair.

"configs/cs_sun.py:consistency" trains with the recommended method instead (docs/RESULTS.md).
"""

import os

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.domain_names = ("cityscapes", "sun")
  c.domains.cityscapes = common.domain("cityscapes", os.path.join(common.DATA_ROOT, "cityscapes"),
                                       crop=(512, 512), resize=(512, 1024))
  c.domains.sun = common.domain("sunrgbd13", os.path.join(common.DATA_ROOT, "sunrgbd"),
                                crop=(480, 640), eval_split="test", resize=(480, 640))
  c.total_steps = 60000
  return common.paper_variant(c, arg, "configs/cs_sun.py")
