"""CamVid (11) + IDD-Lite (7): the real pair in ../shared/data, sized for 2 CPU cores.

Evaluation on CamVid test and IDD-Lite val; labeled images drawn from the train splits.
"""

import os

from configs import common


def get_config():
  c = common.base_config()
  c.domain_names = ("camvid", "idd_lite")
  c.domains.camvid = common.domain("camvid", os.path.join(common.DATA_ROOT, "camvid"),
                                   crop=(96, 128), resize=(180, 240), eval_resize=(180, 240),
                                   scale_range=(0.8, 1.2), eval_split="test", list_suffix=".subset")
  c.domains.idd_lite = common.domain("idd_lite", os.path.join(common.DATA_ROOT, "idd_lite"),
                                     crop=(96, 128), resize=(114, 160), eval_resize=(114, 160),
                                     scale_range=(0.8, 1.2), eval_split="val")
  c.num_labeled = 10
  c.encoder = "drn_d_22"
  c.encoder_channels = (8, 16, 32, 48, 64, 96, 96, 96)
  c.embedding_dim = 32
  c.learning_rate = 0.02
  c.labeled_batch = 4
  c.unlabeled_batch = 4
  c.total_steps = 400
  c.label_embeddings.pretrain_steps = 400  # the ablation reuses its single-source runs instead
  c.log_every = 50
  c.eval_every = 400   # final model only: nothing is selected on the evaluation splits
  c.checkpoint_every = 200
  c.eval_batch = 8
  return c
