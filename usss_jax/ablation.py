"""Ablation runner: single / basic / cross / full / ser over several seeds, one table.

  python -m usss_jax.ablation --config=configs/camvid_iddlite.py --workdir=runs/ablation \\
      --seeds=0,1,2 [--methods=single,basic,cross,full,ser] [--config.key=value ...]

Per seed (the labeled/unlabeled split depends on the seed and is shared by every
method of that seed):
  single_<d>  method "single" with domain d as the source: the encoder and head d
              learn from d's labeled images alone, the other heads from the frozen
              encoder ("train on source"). Row "single" reports each domain from the
              run where it is the source; the frozen-encoder transfer numbers go to
              the JSON details.
  label embeddings: the encoder of single_<d> defines d's label embeddings (PCA +
              centroids, the paper's B.1) for cross and full, so they are computed
              once per seed and copied into those runs.
  basic, cross, full, ser: universal runs with the config's alpha, beta, ser_weight.
Finished runs are skipped, so an interrupted ablation resumes where it stopped.
Writes <workdir>/results.json (method -> seed -> domain -> mIoU), results_details.json
and results.md (mean ± std over seeds, and per-class IoU like the paper's Table 2).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from usss_jax import embedding_stage, train

METHOD_ORDER = ("single", "basic", "cross", "full", "ser")


def _run_config(config, method: str, seed: int, **overrides) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config)
  c.unlock()
  c.method = method
  c.seed = seed
  for k, v in overrides.items():
    c[k] = v
  return c


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
  state, results, model, domains = train.run_training(config, workdir)
  summary = {
      "mean_miou": results["mean_miou"],
      "domains": {d.name: {"miou": results[d.name]["miou"], "iou": results[d.name]["iou"]}
                  for d in domains if d.name in results},
      "wall_seconds": time.time() - start,
      "steps": int(config.total_steps),
  }
  train._write_json_atomic(os.path.join(workdir, "final_eval.json"), summary)
  return summary


def _embeddings_from_single(config, workdir: str, source: str, out_path: str) -> None:
  """Label embeddings of `source` from the encoder of its single-source run."""
  if os.path.exists(out_path):
    return
  from usss_jax import runtime
  model, variables, domains, _ = runtime.restore_model(config, workdir, which="latest")
  dom = next(d for d in domains if d.name == source)
  computed = embedding_stage.compute_for_domain(config, model, variables, dom)
  computed.source = f"single-source run {workdir}"
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  computed.save(out_path)


def run_ablation(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int],
                 methods: Sequence[str] = METHOD_ORDER) -> dict:
  """Runs every (method, seed); returns {"results": ..., "details": ...}."""
  names = list(config.domain_names)
  unknown = [m for m in methods if m not in METHOD_ORDER]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; choose from {METHOD_ORDER}")
  results: dict = {m: {} for m in methods}
  from usss_jax.data import registry
  details: dict = {"config": json.loads(config.to_json()), "runs": {}, "classes": {}}
  for name in names:  # class-index order for the per-class tables
    dc = config.domains[name]
    details["classes"][name] = list(registry.get_reader(
        dc.dataset, dc.root, **dc.options.to_dict()).spec.classes)
  needs_embeddings = any(m in ("cross", "full") for m in methods)
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
      if method in ("cross", "full") and config.label_embeddings.source == "pretrain":
        target = embedding_stage.embeddings_dir(run_dir)
        os.makedirs(target, exist_ok=True)
        for name in names:
          dst = os.path.join(target, f"{name}.npz")
          if not os.path.exists(dst):
            shutil.copyfile(os.path.join(emb_dir, f"{name}.npz"), dst)
      summary = _train(cfg, run_dir)
      details["runs"][f"seed{seed}/{method}"] = summary
      results[method][str(seed)] = {n: summary["domains"][n]["miou"] for n in names}
    write_tables(workdir, results, details, names)
  return {"results": results, "details": details}


def _mean_std(values: Sequence[float]) -> str:
  v = np.asarray(values, np.float64) * 100
  return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def markdown_table(results: dict, details: dict, names: Sequence[str]) -> str:
  """Mean ± std mIoU (%) over seeds per method and domain, and per-class IoU."""
  lines = ["| method | " + " | ".join(names) + " | average | seeds |",
           "|---|" + "---|" * (len(names) + 2)]
  for method in METHOD_ORDER:
    per_seed = results.get(method, {})
    if not per_seed:
      continue
    cells = [_mean_std([per_seed[s][n] for s in per_seed]) for n in names]
    avg = _mean_std([np.mean([per_seed[s][n] for n in names]) for s in per_seed])
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg} | {len(per_seed)} |")
  out = ["## mIoU (%) per domain, mean ± std over seeds", "", *lines, ""]
  for name in names:
    classes, rows = None, []
    for method in METHOD_ORDER:
      runs = [v for k, v in details["runs"].items()
              if (k.endswith(f"/{method}") or (method == "single" and k.endswith(f"/single_{name}")))]
      if not runs:
        continue
      ious = [r["domains"][name]["iou"] for r in runs if name in r["domains"]]
      classes = classes or details.get("classes", {}).get(name) or list(ious[0])
      means = [np.nanmean([np.nan if i[c] is None else i[c] for i in ious]) * 100 for c in classes]
      rows.append(f"| {method} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    if classes:
      out += [f"## {name}: per-class IoU (%), mean over seeds", "",
              "| method | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes),
              *rows, ""]
  return "\n".join(out)


def plot_results(results: dict, names: Sequence[str], path: str) -> None:
  """Bar chart: mean mIoU (%) per method and domain, error bars = std over seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = [m for m in METHOD_ORDER if results.get(m)]
  columns = list(names) + ["average"]
  fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 3.6))
  width = 0.8 / max(len(methods), 1)
  for i, method in enumerate(methods):
    per_seed = results[method]
    values = np.array([[per_seed[s][n] for n in names] for s in per_seed]) * 100
    values = np.concatenate([values, values.mean(1, keepdims=True)], axis=1)
    x = np.arange(len(columns)) + (i - (len(methods) - 1) / 2) * width
    ax.bar(x, values.mean(0), width, yerr=values.std(0) if len(values) > 1 else None,
           label=f"{method} (n={len(values)})", capsize=2)
  ax.set_xticks(np.arange(len(columns)), columns)
  ax.set_ylabel("mIoU (%)")
  ax.legend(fontsize=8, ncols=min(len(methods), 3), loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_tables(workdir: str, results: dict, details: dict, names: Sequence[str]) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  train._write_json_atomic(os.path.join(workdir, "results.json"), results)
  train._write_json_atomic(os.path.join(workdir, "results_details.json"), details)
  tmp = os.path.join(workdir, "results.md.tmp")
  with open(tmp, "w") as f:
    f.write(markdown_table(results, details, names))
  os.replace(tmp, os.path.join(workdir, "results.md"))
  plot_results(results, names, os.path.join(workdir, "results.png"))


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Ablation directory (one subfolder per run).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_METHODS = flags.DEFINE_list("methods", list(METHOD_ORDER), "Methods to run.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  out = run_ablation(_CONFIG.value, _WORKDIR.value, [int(s) for s in _SEEDS.value],
                     _METHODS.value)
  print(markdown_table(out["results"], out["details"], list(_CONFIG.value.domain_names)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
