"""The self-supervised stage: dense contrastive pretraining of the shared encoder.

With `config.self_supervised.steps` > 0 the run first pretrains the encoder on the training
images of every domain, labels unread (`usss_jax.self_supervised.pretrain`), in
`<workdir>/self_supervised/`, then starts from that encoder (`config.pretrained`); every
method can use it, and the warm start and the label embeddings come after it. The stage is
cached: a finished pretraining (its `encoder.npz`) is reused on resume if its options equal the
config's; an interrupted one resumes from its last checkpoint (every `checkpoint_every` steps,
and on SIGTERM).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Sequence

import ml_collections

from usss_jax.domains import Domain
from usss_jax.self_supervised import pretrain

log = logging.getLogger("usss_jax")


def self_supervised_dir(workdir: str) -> str:
  return os.path.join(workdir, "self_supervised")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (naming the keys) where the stage cannot serve the config."""
  if int(config.self_supervised.steps) <= 0:
    return
  for key in ("pretrained", "init_from"):
    if config[key]:
      raise ValueError(
          f"config.self_supervised.steps={config.self_supervised.steps} pretrains the encoder "
          f"from scratch, but config.{key} also sets the starting weights; set one of the two")
  pretrain.PretrainOptions.from_config(config)  # its own value checks


def _finished_encoder(sub_workdir: str, options: pretrain.PretrainOptions) -> str | None:
  """The cached encoder.npz of a finished pretraining with the same options, or None."""
  encoder = os.path.join(sub_workdir, pretrain.ENCODER_FILE)
  if not os.path.exists(encoder):
    return None
  pretrain.check_recorded_options(sub_workdir, options)
  return encoder


def prepare(config: ml_collections.ConfigDict, workdir: str,
            domains: Sequence[Domain]) -> ml_collections.ConfigDict:
  """`config` starting from the pretrained encoder (pretrained here first if needed)."""
  if int(config.self_supervised.steps) <= 0:
    return config
  check_config(config)
  options = pretrain.PretrainOptions.from_config(config)
  sub_workdir = self_supervised_dir(workdir)
  encoder = _finished_encoder(sub_workdir, options)
  if encoder is None:
    log.info("self-supervised pretraining: %d steps in %s", options.steps, sub_workdir)
    encoder = pretrain.pretrain(config, sub_workdir, options, domains,
                                log=lambda line: log.info("[self-supervised] %s", line))["encoder"]
  else:
    log.info("self-supervised pretraining: reusing %s", encoder)
  out = copy.deepcopy(config)
  out.unlock()
  out.pretrained = encoder
  return out
