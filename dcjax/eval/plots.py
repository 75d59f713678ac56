"""PNG plots of the decoding-order analysis (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  return plt


def plot_arness(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str,
                title: str = "") -> str:
  """Local and global AR-ness@k against k, one line per label (e.g. per temperature).

  `curves[label]` is an `arness_curves(...)` dict: {"k", "local", "global"}.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
  for label, curve in curves.items():
    for ax, key in zip(axes, ("local", "global")):
      ax.plot(curve["k"], curve[key], marker="o", label=label)
  for ax, name in zip(axes, ("local", "global")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_title(f"{name} AR-ness@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("AR-ness")
  axes[1].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, plt, path)


def plot_confidence_curve(curves: Mapping[str, np.ndarray], path: str,
                          title: str = "step-0 confidence over the masked region") -> str:
  """Mean step-0 confidence against position after the prompt, one line per label."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for label, curve in curves.items():
    curve = np.asarray(curve, dtype=np.float64)
    ax.plot(np.arange(len(curve)), curve, label=label)
  ax.set_xlabel("position after the prompt")
  ax.set_ylabel("confidence")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
