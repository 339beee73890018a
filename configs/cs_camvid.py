"""Cityscapes (19) + CamVid (11): the paper's recipe (crops 512x512 and 360x480).

"configs/cs_camvid.py:consistency" trains with the recommended method instead (docs/RESULTS.md).
"""

import os

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.domain_names = ("cityscapes", "camvid")
  c.domains.cityscapes = common.domain("cityscapes", os.path.join(common.DATA_ROOT, "cityscapes"),
                                       crop=(512, 512), resize=(512, 1024))
  c.domains.camvid = common.domain("camvid", os.path.join(common.DATA_ROOT, "camvid"),
                                   crop=(360, 480), eval_split="test")
  c.total_steps = 60000
  return common.paper_variant(c, arg, "configs/cs_camvid.py")
