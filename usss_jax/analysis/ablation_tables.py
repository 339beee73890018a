"""The ablation's tables and figures: mean ± std per method, paired differences to basic with
their 95 % t intervals, per-class IoU, the pseudo-label class shares over training, and the
unsupervised diagnostics' curves, read from an ablation directory (`usss_jax.ablation`).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from scipy import stats

from usss_jax import files, metric_writers, objectives
from usss_jax.analysis import plots

METHOD_ORDER = tuple(objectives.METHODS)


def _row_order(results: dict) -> list[str]:
  """The methods of `results` in table order: METHODS' order, then extra rows (references)."""
  extra = sorted(m for m, v in results.items() if isinstance(v, dict) and m not in METHOD_ORDER)
  return [m for m in METHOD_ORDER if m in results] + extra


def _per_seed(results: dict) -> dict[str, dict]:
  """The method -> seed -> domain -> mIoU part of results (without "recommended")."""
  return {m: v for m, v in results.items() if isinstance(v, dict)}


def paired_differences(results: dict, names: Sequence[str], baseline: str = "basic") -> dict:
  """Per method: its domain-average mIoU minus the baseline's, seed by seed (same splits).

  Returns:
    {method: {"mean", "low", "high" (95 % t interval of the mean), "per_seed": {seed: diff},
    "positive": count of seeds with diff > 0, "n"}}, differences in mIoU points (x 100).
  """
  per_seed = _per_seed(results)
  base = per_seed.get(baseline, {})
  out = {}
  for method, runs in per_seed.items():
    seeds = sorted(set(runs) & set(base), key=int)
    if method == baseline or not seeds:
      continue
    diffs = np.array([100 * (np.mean([runs[s][n] for n in names]) -
                             np.mean([base[s][n] for n in names])) for s in seeds])
    half = (stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
            if len(diffs) > 1 else float("nan"))
    out[method] = {"mean": float(diffs.mean()), "low": float(diffs.mean() - half),
                   "high": float(diffs.mean() + half), "n": len(diffs),
                   "positive": int(np.sum(diffs > 0)),
                   "per_seed": {s: float(d) for s, d in zip(seeds, diffs)}}
  return out


def _mean_std(values: Sequence[float]) -> str:
  v = np.asarray(values, np.float64) * 100
  return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def markdown_table(results: dict, details: dict, names: Sequence[str]) -> str:
  """Mean ± std mIoU (%) over seeds per method and domain, paired differences to basic, and
  per-class IoU."""
  lines = ["| method | " + " | ".join(names) + " | average | seeds |",
           "|---|" + "---|" * (len(names) + 2)]
  for method in _row_order(results):
    per_seed = results.get(method, {})
    if not per_seed:
      continue
    cells = [_mean_std([per_seed[s][n] for s in per_seed]) for n in names]
    avg = _mean_std([np.mean([per_seed[s][n] for n in names]) for s in per_seed])
    mark = " (recommended)" if results.get("recommended") == method else ""
    lines.append(f"| {method}{mark} | " + " | ".join(cells) + f" | {avg} | {len(per_seed)} |")
  out = ["## mIoU (%) per domain, mean ± std over seeds", "", *lines, ""]
  diffs = paired_differences(results, names)
  if diffs:
    out += ["## Paired difference to basic (two-domain average, mIoU points; same seed = same "
            "labeled/unlabeled split)", "",
            "| method | mean | 95 % interval | seeds > 0 | per seed |", "|---|---|---|---|---|"]
    for method in _row_order(results):
      if method in diffs:
        d = diffs[method]
        seeds = ", ".join(f"{s}: {v:+.1f}" for s, v in d["per_seed"].items())
        out.append(f"| {method} | {d['mean']:+.1f} | [{d['low']:+.1f}, {d['high']:+.1f}] | "
                   f"{d['positive']}/{d['n']} | {seeds} |")
    out.append("")
  for name in names:
    classes, rows = None, []
    for method in _row_order(results):
      runs = [v for k, v in details["runs"].items()
              if k.endswith(f"/{method}")
              or (method == "single" and k.endswith(f"/single_{name}"))]
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


def write_tables(workdir: str, results: dict, details: dict, names: Sequence[str]) -> None:
  if jax.process_index() != 0:
    return
  files.write_json(os.path.join(workdir, "results.json"), results)
  files.write_json(os.path.join(workdir, "results_details.json"), details)
  shares = pseudo_label_share_table(workdir, names, details.get("classes", {}))
  files.write_text(os.path.join(workdir, "results.md"),
                   markdown_table(results, details, names) + ("\n" + shares if shares else ""))
  plots.plot_method_bars(_per_seed(results), names, _row_order(results),
                         os.path.join(workdir, "results.png"))
  curves = unsupervised_curves(workdir)
  if curves:
    plots.plot_unsupervised_terms(curves, os.path.join(workdir, "unsupervised_terms.png"))


def _train_records(workdir: str) -> dict[str, list[list[dict]]]:
  """{run name: [the train records of its metrics.jsonl, per seed]} of an ablation directory."""
  runs: dict = {}
  for seed_dir in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    if not seed_dir.startswith("seed"):
      continue
    for method in sorted(os.listdir(os.path.join(workdir, seed_dir))):
      path = os.path.join(workdir, seed_dir, method, "metrics.jsonl")
      if os.path.exists(path):
        runs.setdefault(method, []).append(
            [r for r in metric_writers.read_records(path) if r.get("kind") == "train"])
  return runs


def pseudo_label_share_table(workdir: str, names: Sequence[str],
                             classes: dict[str, list[str]], points: int = 4) -> str:
  """Markdown: per method and domain, each class's share (%) of the confident pseudo-labels at
  `points` steps spread over training (mean over seeds), and of the labeled pixels; "" if no
  run logs them (`pseudo_label_share/<domain>/<class>`, written by consistency)."""
  out = []
  for method, runs in _train_records(workdir).items():
    for name in names:
      prefix = f"pseudo_label_share/{name}/"
      logged = [{r["step"]: r for r in records if any(k.startswith(prefix) for k in r)}
                for records in runs]
      logged = [by_step for by_step in logged if by_step]
      if not logged:
        continue
      steps = sorted(set.intersection(*(set(by_step) for by_step in logged)))
      if not steps:
        continue
      picked = sorted({steps[round(i * (len(steps) - 1) / max(points - 1, 1))]
                       for i in range(points)})
      ids = sorted({int(k[len(prefix):]) for by_step in logged for k in by_step[steps[-1]]
                    if k.startswith(prefix)})
      labels = classes.get(name) or [str(i) for i in ids]

      def mean_share(key: str, step: int) -> str:
        values = [by_step[step].get(key) for by_step in logged]
        values = [v for v in values if v is not None]
        return f"{100 * np.mean(values):.1f}" if values else "-"
      rows = [f"| step {step} | " + " | ".join(mean_share(f"{prefix}{i}", step) for i in ids) +
              " |" for step in picked]
      rows.append("| labeled pixels | " + " | ".join(
          mean_share(f"labeled_share/{name}/{i}", steps[-1]) for i in ids) + " |")
      out += [f"## {method}, {name}: class shares of the confident pseudo-labels (%), mean over "
              f"{len(logged)} seeds", "",
              "| | " + " | ".join(labels[i] if i < len(labels) else str(i) for i in ids) + " |",
              "|---|" + "---|" * len(ids), *rows, ""]
  return "\n".join(out)


# Logged per domain by the terms (usss_jax.objectives): what shows a collapse.
UNSUPERVISED_TERMS = ("within_entropy", "cross_domain_entropy", "diversity", "confident_fraction",
                      "consistency", "embedding_norm")
# Metric names of earlier releases, read from older runs' metrics.jsonl.
_OLD_NAMES = {"cross_domain_entropy": "cross_entropy"}


def unsupervised_curves(workdir: str) -> dict:
  """{method: {term: (steps, values)}}: the unsupervised diagnostics over training, averaged
  over domains and seeds, read from every run's metrics.jsonl."""
  by_method: dict = {}
  for method, runs in _train_records(workdir).items():
    for records in runs:
      for term in UNSUPERVISED_TERMS:
        prefix = term + "/"
        if not any(k.startswith(prefix) for r in records for k in r) and term in _OLD_NAMES:
          prefix = _OLD_NAMES[term] + "/"
        points = [(r["step"], np.mean([v for k, v in r.items()
                                       if k.startswith(prefix) and v is not None]))
                  for r in records if any(k.startswith(prefix) for k in r)]
        if points:
          by_method.setdefault(method, {}).setdefault(term, []).append(dict(points))
  curves = {}
  for method, terms in by_method.items():
    for term, runs in terms.items():
      steps = sorted(set.intersection(*(set(r) for r in runs)))
      curves.setdefault(method, {})[term] = (steps, [float(np.mean([r[s] for r in runs]))
                                                     for s in steps])
  return curves
