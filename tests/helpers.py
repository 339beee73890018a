"""The tiny configs the tests share (CPU-sized: seconds per run, 8 fake devices)."""

import os

import ml_collections

from configs import common

# DRN-D-22 layout with tiny widths: wiring tests, not accuracy.
TINY = (4, 8, 12, 16, 20, 24, 28, 32)


def set_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Applies {"a.b": value} overrides (dotted keys reach nested entries)."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def tiny_demo_config(data_root: str, **overrides) -> ml_collections.ConfigDict:
  """A few-second universal run on (a small copy of) the demo data."""
  c = common.base_config()
  c.domain_names = ("street", "indoor")
  for name in c.domain_names:
    c.domains[name] = common.domain("folder", os.path.join(data_root, name), crop=(32, 48),
                                    generate_demo=True)
  c.method = "full"
  c.num_labeled = 4
  c.encoder_channels = TINY
  c.embedding_dim = 8
  c.learning_rate = 0.05
  c.labeled_batch = 8
  c.unlabeled_batch = 8
  c.eval_batch = 8
  c.total_steps = 8
  c.checkpoint_every = 2
  c.eval_every = 8
  c.log_every = 1
  c.eval_max_examples = 8
  c.label_embeddings.source = "random"
  return set_overrides(c, overrides)


def tiny_synthetic_config(names, crop_hw, method: str = "full",
                          **overrides) -> ml_collections.ConfigDict:
  """Domains without data on disk (train-step tests feed their own batches)."""
  c = common.base_config()
  c.method = method
  c.domain_names = tuple(names)
  for n in names:
    c.domains[n] = common.domain("folder", "/nonexistent", crop=crop_hw)
  c.encoder_channels = TINY
  c.embedding_dim = 6
  c.learning_rate = 0.05
  c.total_steps = 10
  c.labeled_batch = 8
  c.unlabeled_batch = 8
  c.eval_batch = 8
  return set_overrides(c, overrides)
