"""Figures of the analyses (matplotlib, object-oriented API: no pyplot state)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
import numpy as np

from usss_jax import files

_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def _figure(**kwargs):
  # Figure + Agg canvas: no pyplot global state, no backend switch.
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def plot_heatmap(matrix: np.ndarray, row_names: Sequence[str], col_names: Sequence[str],
                 path: str, *, title: str, xlabel: str, ylabel: str,
                 vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
                 annotate_limit: int = 400) -> str:
  """Writes a [R, C] heat map with class names on the axes to `path` (PNG).

  Values are printed in the cells when R * C <= annotate_limit.
  """
  m = np.asarray(matrix, np.float64)
  rows, cols = m.shape
  if (rows, cols) != (len(row_names), len(col_names)):
    raise ValueError(f"matrix shape {m.shape} does not fit {len(row_names)} row and "
                     f"{len(col_names)} column names")
  fig = _figure(figsize=(max(4.5, 0.65 * cols + 3.0), max(3.5, 0.5 * rows + 2.0)),
                layout="constrained", dpi=120)
  ax = fig.add_subplot()
  image = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
  ax.set_xticks(range(cols), labels=list(col_names), rotation=45, ha="right",
                rotation_mode="anchor")
  ax.set_yticks(range(rows), labels=list(row_names))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  fig.colorbar(image, ax=ax, shrink=0.9)
  if rows * cols <= annotate_limit:
    for i in range(rows):
      for j in range(cols):
        # Dark text on light cells and vice versa, whatever the colour map.
        r, g, b, _ = image.cmap(image.norm(m[i, j]))
        colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
  _save(fig, path)
  return path


@dataclasses.dataclass
class TsnePanel:
  """The t-SNE points of one run: points with their (domain, class) keys.

  Attributes:
    title: the run's title.
    points: [N, 2] t-SNE coordinates.
    domain_ids: [N] index into `domain_names`.
    class_ids: [N] class id within the point's domain.
    domain_names: the run's domains.
    class_names: per domain, its class names.
  """
  title: str
  points: np.ndarray
  domain_ids: np.ndarray
  class_ids: np.ndarray
  domain_names: tuple[str, ...]
  class_names: tuple[tuple[str, ...], ...]


# 20 colours told apart easily on white (after Trubetskoy's list, the palest left out); beyond
# 20 classes the colours repeat with another marker.
DISTINCT_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
                    "#f032e6", "#9a6324", "#469990", "#000075", "#800000", "#808000",
                    "#bfef45", "#a9a9a9", "#ffe119", "#000000", "#dcbeff", "#fabed4",
                    "#aaffc3", "#ffd8b1")
_BACKGROUND = "#d9d9d9"


def _class_style(c: int) -> tuple[str, str]:
  """(colour, marker) of class `c` in the t-SNE panels."""
  return (DISTINCT_COLOURS[c % len(DISTINCT_COLOURS)],
          _MARKERS[(c // len(DISTINCT_COLOURS)) % len(_MARKERS)])


def plot_tsne(panels: Sequence[TsnePanel], path: str) -> str:
  """One row per run: its points coloured by domain, then one panel per domain with that
  domain's classes in distinct colours (the other domains' points grey behind them); the
  legends sit under the last row."""
  if not panels:
    raise ValueError("plot_tsne needs at least one panel")
  domains = list(dict.fromkeys(d for p in panels for d in p.domain_names))
  classes = {d: next(p.class_names[p.domain_names.index(d)] for p in panels
                     if d in p.domain_names) for d in domains}
  rows, cols = len(panels), 1 + len(domains)
  legend_rows = -(-max(len(c) for c in classes.values()) // 2)
  fig = _figure(figsize=(4.2 * cols, 4.2 * rows + 0.2 * legend_rows + 0.8),
                layout="constrained", dpi=110)
  axes = fig.subplots(rows, cols, squeeze=False)
  below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, frameon=False)
  for r, p in enumerate(panels):
    ax = axes[r, 0]
    for d, dname in enumerate(p.domain_names):
      sel = p.domain_ids == d
      i = domains.index(dname)
      ax.scatter(p.points[sel, 0], p.points[sel, 1], s=7, alpha=0.6, linewidths=0,
                 color=f"C{i}", marker=_MARKERS[i % len(_MARKERS)],
                 label=f"{dname} ({int(sel.sum())} pixels)")
    ax.set_title(f"{p.title}: by domain", fontsize=10)
    if r == rows - 1:
      ax.legend(markerscale=2, **below)
    for c, dname in enumerate(domains, start=1):
      ax = axes[r, c]
      own = p.domain_ids == (p.domain_names.index(dname) if dname in p.domain_names else -1)
      ax.scatter(p.points[~own, 0], p.points[~own, 1], s=4, color=_BACKGROUND, linewidths=0)
      for k in range(len(classes[dname])):
        sel = own & (p.class_ids == k)
        colour, marker = _class_style(k)
        ax.scatter(p.points[sel, 0], p.points[sel, 1], s=9, alpha=0.85, color=colour,
                   marker=marker, linewidths=0)
      ax.set_title(f"{p.title}: {dname} classes", fontsize=10)
      if r == rows - 1:
        handles = [Line2D([], [], linestyle="", marker=_class_style(k)[1],
                          color=_class_style(k)[0], markersize=6, label=name)
                   for k, name in enumerate(classes[dname])]
        handles.append(Line2D([], [], linestyle="", marker="o", color=_BACKGROUND,
                              markersize=6, label="other domains"))
        ax.legend(handles=handles, ncols=2, **below)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle("t-SNE of encoder features (pixels sampled per class and domain)", fontsize=11)
  _save(fig, path)
  return path


def _save(fig, path: str) -> None:
  """Writes the figure as a PNG through `files.atomic_write` (its folder made if needed)."""
  with files.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png")


def plot_method_bars(results: dict, names: Sequence[str], order: Sequence[str],
                     path: str) -> str:
  """Bar chart of an ablation: mean mIoU (%) per method and domain over seeds, error bars = one
  standard deviation over seeds (said on the figure); the legend sits right of the axes.

  Args:
    results: method -> seed -> domain -> mIoU in [0, 1].
    names: the domains (columns, plus their average).
    order: methods in display order (those absent from `results` are skipped).
  """
  methods = [m for m in order if results.get(m)]
  columns = list(names) + ["average"]
  fig = _figure(figsize=(3.4 + 1.3 * len(columns), 3.9), layout="constrained", dpi=120)
  ax = fig.add_subplot()
  width = 0.8 / max(len(methods), 1)
  seeds = set()
  for i, method in enumerate(methods):
    per_seed = results[method]
    values = np.array([[per_seed[s][n] for n in names] for s in per_seed]) * 100
    values = np.concatenate([values, values.mean(1, keepdims=True)], axis=1)
    seeds.add(len(values))
    x = np.arange(len(columns)) + (i - (len(methods) - 1) / 2) * width
    ax.bar(x, values.mean(0), width, yerr=values.std(0) if len(values) > 1 else None,
           label=f"{method} (n={len(values)})", capsize=2, color=f"C{i}",
           error_kw=dict(elinewidth=1, ecolor="black"))
  ax.set_xticks(np.arange(len(columns)), columns)
  ax.set_ylabel("mIoU (%)")
  ax.set_title("mIoU per domain: bar = mean over seeds, black line = ±1 std over seeds",
               fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  ax.set_axisbelow(True)
  fig.legend(loc="outside right upper", fontsize=8, frameon=False,
             title="method (n = seeds)", title_fontsize=8)
  _save(fig, path)
  return path


# Titles and y-axis labels of the unsupervised diagnostics (`metrics.jsonl` keys,
# usss_jax.objectives) in plot_unsupervised_terms; log scale where the values span decades.
TERM_TITLES = {
    "within_entropy": ("Within-domain entropy of the prototype scores", "nats", True),
    "cross_domain_entropy": ("Cross-domain entropy (other domains' prototypes)", "nats", True),
    "diversity": ("Diversity: entropy of the batch's mean class distribution", "nats", False),
    "confident_fraction": ("Pseudo-labelled pixels (confidence >= threshold)", "fraction",
                           False),
    "consistency": ("Consistency loss (weak-view pseudo-labels on the strong view)",
                    "cross entropy", False),
    "embedding_norm": ("Norm of the pixel embedding", "L2 norm", True),
}


def plot_unsupervised_terms(curves: dict, path: str) -> str:
  """One panel per unsupervised diagnostic over training steps, one line per method.

  Args:
    curves: {method: {term: (steps, values)}} (e.g. `ablation_tables.unsupervised_curves`).
  """
  terms = sorted({t for per_method in curves.values() for t in per_method})
  cols = min(3, len(terms))
  rows = -(-len(terms) // cols)
  fig = _figure(figsize=(4.4 * cols, 3.1 * rows + 0.4), layout="constrained", dpi=110)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  # One colour per method across panels; each panel names its own methods (terms differ).
  colours = {m: f"C{i}" for i, m in enumerate(sorted(curves))}
  for ax, term in zip(axes, terms):
    title, unit, log = TERM_TITLES.get(term, (term.replace("_", " ").capitalize(), "", False))
    for method, per_method in sorted(curves.items()):
      if term in per_method:
        steps, values = per_method[term]
        ax.plot(steps, values, label=method, color=colours[method])
    ax.legend(fontsize=7, title="method", title_fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel(unit + (" (log scale)" if log else ""), fontsize=8)
    ax.grid(alpha=0.3)
    if log:
      ax.set_yscale("log")
  for ax in axes[len(terms):]:
    ax.axis("off")
  fig.suptitle("Unsupervised terms during training (mean over domains and seeds)", fontsize=10)
  _save(fig, path)
  return path
