"""The warm-start stage: a supervised run that the semi-supervised run starts from.

With `config.warm_start.steps` > 0, the run first trains method "basic" (joint supervised, the
same domains, model, seed and labeled images) for that many steps with its own poly schedule in
`<workdir>/warm_start/`, then starts from its final model (`config.init_from`), so that the
teachers of the unlabeled terms start from a converged supervised model rather than from
noise. The stage is cached: a finished warm-start run is reused on resume.

The stage calls training; training never calls the stage.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Sequence

import ml_collections

from usss_jax.domains import Domain
from usss_jax.train import run_training

log = logging.getLogger("usss_jax")


def warm_start_dir(workdir: str) -> str:
  return os.path.join(workdir, "warm_start")


def warm_start_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The supervised run of the warm start: method basic, `warm_start.steps` steps."""
  sub = copy.deepcopy(config)
  sub.unlock()
  sub.method = "basic"
  sub.total_steps = int(config.warm_start.steps)
  sub.eval_every = sub.total_steps
  sub.checkpoint_every = max(1, min(config.checkpoint_every, sub.total_steps))
  sub.warm_start.steps = 0
  sub.init_from = config.init_from
  return sub


def prepare(config: ml_collections.ConfigDict, workdir: str,
            domains: Sequence[Domain]) -> ml_collections.ConfigDict:
  """`config` starting from the finished warm-start run (trained here first if needed)."""
  steps = int(config.warm_start.steps)
  if steps <= 0:
    return config
  sub_workdir = warm_start_dir(workdir)
  log.info("warm start: %d supervised steps in %s", steps, sub_workdir)
  run_training(warm_start_config(config), sub_workdir, domains, log_prefix="[warm start] ")
  out = copy.deepcopy(config)
  out.unlock()
  out.init_from = sub_workdir
  return out
