"""Figures of the analyses (matplotlib, object-oriented API: no pyplot state)."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
import numpy as np

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
  _makedirs_for(path)
  fig.savefig(path)
  return path


@dataclasses.dataclass
class TsnePanel:
  """One t-SNE panel: points with their (domain, class) keys.

  Attributes:
    title: panel title.
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


def plot_tsne(panels: Sequence[TsnePanel], path: str) -> str:
  """Scatter plots side by side: colour = (domain, class), marker = domain; one legend."""
  if not panels:
    raise ValueError("plot_tsne needs at least one panel")
  # The same (domain, class) key gets the same colour in every panel.
  keys: list[tuple[str, str]] = []
  for p in panels:
    for d, names in zip(p.domain_names, p.class_names):
      keys.extend((d, c) for c in names if (d, c) not in keys)
  domains = list(dict.fromkeys(d for d, _ in keys))
  cmap = colormaps["tab10" if len(keys) <= 10 else "tab20" if len(keys) <= 20 else "turbo"]
  colours = {key: cmap(i / max(len(keys) - 1, 1)) if len(keys) > 20 else cmap(i)
             for i, key in enumerate(keys)}
  markers = {d: _MARKERS[i % len(_MARKERS)] for i, d in enumerate(domains)}
  fig = _figure(figsize=(5.5 * len(panels) + 2.2, 5.5), layout="constrained", dpi=120)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, p in zip(axes, panels):
    for d, dname in enumerate(p.domain_names):
      for c, cname in enumerate(p.class_names[d]):
        sel = (p.domain_ids == d) & (p.class_ids == c)
        if sel.any():
          ax.scatter(p.points[sel, 0], p.points[sel, 1], s=12, alpha=0.75,
                     color=colours[(dname, cname)], marker=markers[dname], linewidths=0)
    ax.set_title(p.title)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [Line2D([], [], linestyle="", marker=markers[d], color=colours[(d, c)],
                    markersize=7, label=f"{d}: {c}") for d, c in keys]
  fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
  _makedirs_for(path)
  fig.savefig(path)
  return path


def plot_legend(class_names: Sequence[str], palette: np.ndarray, path: str,
                title: str = "") -> str:
  """Colour key of a label space (class name next to its palette colour)."""
  fig = _figure(figsize=(2.6, 0.3 * len(class_names) + 0.6), dpi=120)
  handles = [Patch(color=np.asarray(palette[i], np.float64) / 255.0, label=name)
             for i, name in enumerate(class_names)]
  fig.legend(handles=handles, loc="center", frameon=False, title=title or None)
  _makedirs_for(path)
  fig.savefig(path, bbox_inches="tight")
  return path


def _makedirs_for(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


def plot_method_bars(results: dict, names: Sequence[str], order: Sequence[str],
                     path: str) -> str:
  """Bar chart of an ablation: mean mIoU (%) per method and domain, error bars = std over seeds.

  Args:
    results: method -> seed -> domain -> mIoU in [0, 1].
    names: the domains (columns, plus their average).
    order: methods in display order (those absent from `results` are skipped).
  """
  methods = [m for m in order if results.get(m)]
  columns = list(names) + ["average"]
  fig = _figure(figsize=(1.6 + 1.3 * len(columns), 3.6), layout="constrained", dpi=120)
  ax = fig.add_subplot()
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
  _makedirs_for(path)
  fig.savefig(path)
  return path


def plot_unsupervised_terms(curves: dict, path: str) -> str:
  """One panel per unsupervised diagnostic over training steps, one line per method.

  Args:
    curves: {method: {term: (steps, values)}} (e.g. `ablation.unsupervised_curves`).
  """
  terms = sorted({t for per_method in curves.values() for t in per_method})
  cols = min(3, len(terms))
  rows = -(-len(terms) // cols)
  fig = _figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained", dpi=110)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  # One colour per method across panels; each panel names its own methods (terms differ).
  colours = {m: f"C{i}" for i, m in enumerate(sorted(curves))}
  for ax, term in zip(axes, terms):
    for method, per_method in sorted(curves.items()):
      if term in per_method:
        steps, values = per_method[term]
        ax.plot(steps, values, label=method, color=colours[method])
    ax.legend(fontsize=7)
    ax.set_title(f"{term} (mean over domains and seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if term in ("within_entropy", "cross_domain_entropy", "embedding_norm"):
      ax.set_yscale("log")
  for ax in axes[len(terms):]:
    ax.axis("off")
  _makedirs_for(path)
  fig.savefig(path)
  return path
