"""Ablation runner: methods x seeds on paired splits, one table and two figures.

  python -m usss_jax.ablation --config=configs/camvid_iddlite.py --workdir=runs/ablation \\
      --seeds=0,1,2 [--methods=single,basic,full,consistency] [--config.key=value ...]

Per seed (the labeled/unlabeled split depends on the seed and is shared by every
method of that seed):
  single_<d>  method "single" with domain d as the source: the encoder and head d
              learn from d's labeled images alone, the other heads from the frozen
              encoder ("train on source"). Row "single" reports each domain from the
              run where it is the source; the frozen-encoder transfer numbers go to
              the JSON details.
  label embeddings: the encoder of single_<d> defines d's label embeddings (PCA +
              centroids, the paper's B.1) for the methods that use them, so they are
              computed once per seed and copied into those runs.
  every other method (by default all of METHOD_HELP): a universal run of that method.
  Supervised rows (single, basic) skip the config's self-supervised stage and warm start and
  train the semi-supervised runs' whole length instead; --basic_from_encoder adds basic from
  the seed's own self-supervised encoder (row basic_from_encoder).
Finished runs are skipped, so an interrupted ablation resumes where it stopped.
Writes (`usss_jax.analysis.ablation_tables`) <workdir>/results.json (method -> seed ->
domain -> mIoU), results_details.json, results.md (mean ± std over seeds, paired differences
to basic, per-class IoU like the paper's Table 2, the pseudo-label class shares over
training), results.png (mIoU bars) and unsupervised_terms.png (the unsupervised diagnostics
over training).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from usss_jax import cli, evaluate, files, label_embedding_stage, modes, objectives
from usss_jax import self_supervised_stage
from usss_jax import config as config_lib
from usss_jax import state as state_lib
from usss_jax import workdir as workdir_lib
from usss_jax.analysis import ablation_tables
from usss_jax.data import registry
from usss_jax.self_supervised import pretrain

METHOD_ORDER = ablation_tables.METHOD_ORDER
# One line per method for --help (the README's table of methods says more).
METHOD_HELP = {
    "single": "one domain's labels train the encoder, the other heads learn on it frozen",
    "basic": "joint supervised training of all domains (univ-basic)",
    "cross": "+ the cross-domain label-embedding term (alpha)",
    "full": "+ cross- and within-domain label-embedding terms (univ-full)",
    "ser": "+ the softmax entropy of each head on unlabeled images",
    "consistency": "+ weak-to-strong consistency per domain",
    "universal": "consistency + the terms of full",
}


def uses_label_embeddings(method: str) -> bool:
  return any(term.label_embeddings for term in objectives.METHODS[method])


def _run_config(config, method: str, seed: int, **overrides) -> ml_collections.ConfigDict:
  """The config of one run. Supervised methods (single, basic) use no unlabeled image: they
  skip the self-supervised stage, and train for the semi-supervised runs' whole length (their
  warm start's steps are added to their own) from the same starting weights otherwise."""
  c = copy.deepcopy(config)
  c.unlock()
  c.method = method
  c.seed = seed
  if not objectives.method_spec(c).uses_unlabeled:
    c.self_supervised.steps = 0
    c.total_steps = int(c.total_steps) + int(c.warm_start.steps)
    c.warm_start.steps = 0
  for k, v in overrides.items():
    c[k] = v
  return c


def machine() -> dict:
  """What the runs ran on: at this scale the CPU's floating-point path acts like a seed."""
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), platform.processor()) \
      if os.path.exists("/proc/cpuinfo") else platform.processor()
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _done(workdir: str) -> dict | None:
  path = os.path.join(workdir, "final_eval.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _train(config, workdir: str) -> dict:
  """Runs one training (resuming if interrupted); caches its final evaluation."""
  cached = _done(workdir)
  if cached is not None:
    return cached
  start = time.time()
  _, results, domains = modes.embed_and_train(config, workdir)
  report = evaluate.summary(results, [d.name for d in domains])
  summary = {
      "mean_miou": report.pop("mean_miou"),
      "domains": report,
      "wall_seconds": time.time() - start,
      "steps": int(config.total_steps),
      "machine": machine(),  # per run: a study's seeds may run on different machines
  }
  files.write_json(os.path.join(workdir, "final_eval.json"), summary)
  return summary


def _embeddings_from_single(config, workdir: str, source: str, out_path: str) -> None:
  """Label embeddings of `source` from the encoder of its single-source run."""
  if os.path.exists(out_path):
    return
  model, state, domains, _ = modes.restore_with_domains(config, workdir, which="latest")
  dom = next(d for d in domains if d.name == source)
  computed = label_embedding_stage.compute_for_domain(config, model,
                                                      state_lib.model_variables(state), dom)
  computed.source = f"single-source run {workdir}"
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  computed.save(out_path)


def _reuse_encoder(seed_dir: str, methods: Sequence[str], run_dir: str) -> None:
  """Copies the self-supervised stage of the seed's first semi-supervised run that has a
  finished one into `run_dir`, where the stage then reuses it (same options) instead of
  pretraining again."""
  target = self_supervised_stage.self_supervised_dir(run_dir)
  if os.path.exists(target):
    return
  for method in methods:
    source = self_supervised_stage.self_supervised_dir(os.path.join(seed_dir, method))
    if os.path.exists(os.path.join(source, pretrain.ENCODER_FILE)):
      shutil.copytree(source, target, ignore=shutil.ignore_patterns(pretrain.CHECKPOINT_DIR))
      return


def run_ablation(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int],
                 methods: Sequence[str] = METHOD_ORDER, recommended: str | None = None,
                 upper_labeled: int = 0, basic_from_encoder: bool = False) -> dict:
  """Runs every (method, seed); returns {"results": ..., "details": ...}.

  Args:
    recommended: the method the experiment recommends (chosen beforehand on validation
      data); recorded as results["recommended"].
    basic_from_encoder: also "basic_from_encoder", basic for the whole length from the
      self-supervised encoder of the seed's semi-supervised run (the same weights, copied): what
      the encoder alone gives, apart from the unlabeled terms.
    upper_labeled: > 0: also "basic_<N>_labeled", basic with N labeled images per domain (the
      upper reference: what more labels would give).
  """
  names = list(config.domain_names)
  unknown = [m for m in methods if m not in METHOD_ORDER]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; choose from {METHOD_ORDER}")
  if recommended is not None and recommended not in methods:
    raise ValueError(f"--recommended={recommended!r} is not among the methods {list(methods)}")
  results: dict = {m: {} for m in methods}
  details: dict = {"config": json.loads(config.to_json()), "runs": {}, "classes": {},
                   "machine": machine()}
  for name in names:  # class-index order for the per-class tables
    dc = config.domains[name]
    details["classes"][name] = list(registry.get_reader(
        dc.dataset, dc.root, **dc.options.to_dict()).spec.classes)
  needs_embeddings = any(uses_label_embeddings(m) for m in methods)

  def train_row(seed: int, row: str, cfg) -> None:
    """Trains (or reads the cached result of) row `row`'s run of `seed`; records its numbers."""
    summary = _train(cfg, os.path.join(workdir, f"seed{seed}", row))
    details["runs"][f"seed{seed}/{row}"] = summary
    results.setdefault(row, {})[str(seed)] = {n: summary["domains"][n]["miou"] for n in names}

  for seed in seeds:
    seed_dir = os.path.join(workdir, f"seed{seed}")
    emb_dir = os.path.join(seed_dir, "label_embeddings")
    if "single" in methods or needs_embeddings:
      per_domain = {}
      for source in names:
        run_dir = os.path.join(seed_dir, f"single_{source}")
        cfg = _run_config(config, "single", seed, single_domain=source)
        summary = _train(cfg, run_dir)
        details["runs"][f"seed{seed}/single_{source}"] = summary
        per_domain[source] = summary["domains"][source]["miou"]
        if needs_embeddings and config.label_embeddings.source == "pretrain":
          _embeddings_from_single(cfg, run_dir, source, os.path.join(emb_dir, f"{source}.npz"))
      if "single" in methods:
        results["single"][str(seed)] = per_domain
    for method in methods:
      if method == "single":
        continue
      run_dir = os.path.join(seed_dir, method)
      cfg = _run_config(config, method, seed)
      if uses_label_embeddings(method) and config.label_embeddings.source == "pretrain":
        target = label_embedding_stage.embeddings_dir(run_dir)
        os.makedirs(target, exist_ok=True)
        for name in names:
          dst = os.path.join(target, f"{name}.npz")
          if not os.path.exists(dst):
            shutil.copyfile(os.path.join(emb_dir, f"{name}.npz"), dst)
      train_row(seed, method, cfg)
    if basic_from_encoder:
      cfg = _run_config(config, "basic", seed)
      cfg.self_supervised.steps = config.self_supervised.steps
      _reuse_encoder(seed_dir, methods, os.path.join(seed_dir, "basic_from_encoder"))
      train_row(seed, "basic_from_encoder", cfg)
    if upper_labeled > 0:
      train_row(seed, f"basic_{upper_labeled}_labeled",
                _run_config(config, "basic", seed, num_labeled=upper_labeled))
    if recommended:
      results["recommended"] = recommended
    ablation_tables.write_tables(workdir, results, details, names)
  return {"results": results, "details": details}


HELP = ("python -m usss_jax.ablation --config=CONFIG --workdir=DIR [--seeds=0,1,2] "
        "[--methods=...]: every method x seed on paired splits -> results.{json,md,png}, "
        "unsupervised_terms.png. Finished runs are skipped (rerun to resume).\n\nmethods "
        f"(--methods, default all {len(METHOD_ORDER)}):\n" +
        "".join(f"  {m:12s} {METHOD_HELP.get(m, '')}\n" for m in METHOD_ORDER))
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (required).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Ablation directory, one subfolder per seed and "
                               "run (required).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (integers); each seed's split is "
                           "shared by its methods.")
_RECOMMENDED = flags.DEFINE_string("recommended", None, "The method this experiment recommends "
                                   "(chosen on validation data); recorded in results.json.")
_METHODS = flags.DEFINE_list("methods", list(METHOD_ORDER), "Methods to run (listed above).")
_FROM_ENCODER = flags.DEFINE_bool(
    "basic_from_encoder", False, "Also basic from the self-supervised encoder of each seed's "
    "semi-supervised run, for the whole length (row basic_from_encoder: the encoder's share).")
_UPPER = flags.DEFINE_integer("upper_labeled", 0, "Also basic with this many labeled images per "
                              "domain (the upper reference row), 0 = not.")
cli.define_data_root_flag()


def check_flags(config, workdir: str | None, seeds: Sequence[str], methods: Sequence[str],
                recommended: str | None, upper_labeled: int = 0,
                basic_from_encoder: bool = False) -> list[int]:
  """Every flag checked before the first run: the integer seeds."""
  if config is None:
    raise app.UsageError("--config is required")
  if not workdir:
    raise app.UsageError("--workdir is required")
  modes.check_workdir(workdir)
  unknown = [m for m in methods if m not in METHOD_ORDER]
  if unknown or not methods:
    raise app.UsageError(f"--methods: unknown {unknown or 'empty list'}; choose from "
                         f"{','.join(METHOD_ORDER)}")
  if recommended is not None and recommended not in methods:
    raise app.UsageError(f"--recommended={recommended!r} is not among "
                         f"--methods={','.join(methods)}")
  try:
    parsed = [int(s) for s in seeds]
  except ValueError:
    raise app.UsageError(f"--seeds={','.join(seeds)}: expected integers, e.g. --seeds=0,1,2"
                         ) from None
  if not parsed:
    raise app.UsageError("--seeds is empty: name at least one seed")
  if basic_from_encoder and int(config.self_supervised.steps) <= 0:
    raise app.UsageError("--basic_from_encoder: the config pretrains no encoder; set "
                         "--config.self_supervised.steps to the pretraining's length")
  if upper_labeled < 0:
    raise app.UsageError(f"--upper_labeled={upper_labeled}: expected a number of labeled images "
                         "per domain, or 0 for no upper reference row")
  for method in methods:  # each method's own keys, and the datasets, before any training
    modes.check_config(_run_config(config, method, parsed[0]))
  config_lib.check_dataset_roots(config)
  return parsed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  seeds = check_flags(_CONFIG.value, _WORKDIR.value, _SEEDS.value, _METHODS.value,
                      _RECOMMENDED.value, _UPPER.value, _FROM_ENCODER.value)
  cli.setup_logging()
  try:
    out = run_ablation(_CONFIG.value, _WORKDIR.value, seeds, _METHODS.value,
                       recommended=_RECOMMENDED.value, upper_labeled=_UPPER.value,
                       basic_from_encoder=_FROM_ENCODER.value)
  except workdir_lib.Stopped as stopped:  # a requested stop is a success; rerun to continue
    print(stopped, file=sys.stderr)
    return
  print(ablation_tables.markdown_table(out["results"], out["details"],
                                      list(_CONFIG.value.domain_names)))


if __name__ == "__main__":
  cli.run(main, help_text=HELP, help_modules=[__name__, cli.__name__])
