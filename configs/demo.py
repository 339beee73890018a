"""The embedded two-domain demo (street-like and indoor-like scenes), sized for 2 CPU cores.

python launch.py --config=configs/demo.py --workdir=runs/demo
"""

import os

from usss_jax import config as config_lib

DEMO_ROOT = os.environ.get("USSS_DEMO_DATA", os.path.expanduser("~/.cache/usss_jax/demo"))


def get_config():
  c = config_lib.base_config()
  c.domain_names = ("street", "indoor")
  c.domains.street = config_lib.domain("folder", os.path.join(DEMO_ROOT, "street"), crop=(64, 96),
                                       scale_range=(0.75, 1.25), generate_demo=True)
  c.domains.indoor = config_lib.domain("folder", os.path.join(DEMO_ROOT, "indoor"), crop=(64, 96),
                                       scale_range=(0.75, 1.25), generate_demo=True)
  c.num_labeled = 8
  c.encoder = "drn_d_22"
  c.encoder_channels = (8, 16, 24, 32, 48, 64, 64, 64)
  c.embedding_dim = 16
  c.learning_rate = 0.05
  c.labeled_batch = 4
  c.unlabeled_batch = 4
  c.total_steps = 1200
  c.label_embeddings.pretrain_steps = 300
  c.log_every = 50
  c.eval_every = 400
  c.checkpoint_every = 200
  c.eval_batch = 8
  return c
