"""Decoding-order analysis (docs/evaluation.md, DiffuCoder §4): AR-ness and the step-0 confidence.

Input is the sampler's record of when each generated position was revealed: an integer
array `reveal_steps` of shape [L] or [B, L] (entries < 0, e.g. prompt or padding, are
left out). The reveal order p_0, p_1, ... sorts positions by step; positions revealed in
the same step are taken left to right, so with one token per step this is exactly the
paper's order.

  local AR-ness@k:  over steps t >= k, the fraction where the k positions revealed just
                    before are p_t - 1, ..., p_t - k (a k-long run of next-token steps).
  global AR-ness@k: over all steps, the fraction where p_t is among the k leftmost
                    positions still masked at that step.

Left-to-right decoding scores 1 on both for every k. For a batch the per-sequence values
are averaged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def reveal_order(reveal_steps_L) -> np.ndarray:
  """Positions in the order they were revealed (ties by position; negatives dropped)."""
  steps = np.asarray(reveal_steps_L)
  if steps.ndim != 1:
    raise ValueError(f"reveal_order: expected a 1-D array of steps, got shape {steps.shape}")
  positions = np.flatnonzero(steps >= 0)
  return positions[np.lexsort((positions, steps[positions]))]


def _rows(reveal_steps) -> np.ndarray:
  steps = np.asarray(reveal_steps)
  if steps.ndim == 1:
    steps = steps[None]
  if steps.ndim != 2 or not np.issubdtype(steps.dtype, np.integer):
    raise ValueError(f"reveal_steps must be an integer array [L] or [B, L], got "
                     f"{steps.dtype} {steps.shape}")
  return steps


def _check_k(k: int) -> None:
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"AR-ness: k must be a positive integer, got {k!r}")


def local_arness_row(reveal_steps_L, k: int) -> float:
  _check_k(k)
  p = reveal_order(reveal_steps_L)
  if len(p) <= k:
    return float("nan")
  next_token = (np.diff(p) == 1).astype(np.int64)  # [T-1]: p_t == p_{t-1} + 1, t >= 1
  runs = np.concatenate([[0], np.cumsum(next_token)])
  # Step t hits when the k differences ending at t are all 1.
  return float(np.mean(runs[k:] - runs[:-k] == k))


def global_arness_row(reveal_steps_L, k: int) -> float:
  _check_k(k)
  p = reveal_order(reveal_steps_L)
  if not len(p):
    return float("nan")
  later_T_T = np.triu(np.ones((len(p), len(p)), dtype=bool), 1)  # [t, s]: s revealed after t
  masked_left = (later_T_T & (p[None, :] < p[:, None])).sum(axis=1)
  return float(np.mean(masked_left < k))


def local_arness(reveal_steps, k: int) -> float:
  """Mean local AR-ness@k over sequences ([L] or [B, L])."""
  return float(np.nanmean([local_arness_row(r, k) for r in _rows(reveal_steps)]))


def global_arness(reveal_steps, k: int) -> float:
  """Mean global AR-ness@k over sequences ([L] or [B, L])."""
  return float(np.nanmean([global_arness_row(r, k) for r in _rows(reveal_steps)]))


def arness_curves(reveal_steps, ks: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> dict:
  """{"k": [...], "local": [...], "global": [...]} for plotting."""
  return {"k": list(ks), "local": [local_arness(reveal_steps, k) for k in ks],
          "global": [global_arness(reveal_steps, k) for k in ks]}


def confidence_from_logits(logits, alg: str = "entropy", temperature: float = 0.0,
                           top_p: float | None = None) -> np.ndarray:
  """Per-position confidence as the sampler scores it (docs/sampler.md), from logits [..., V].

  The distribution is softmax(logits / temperature) (plain softmax when temperature is
  0), top-p filtered when `top_p` < 1 (the first token that crosses p is kept) and
  renormalised. `maskgit_plus`: probability of the most likely token; `topk_margin`:
  p1 - p2; `entropy`: sum p log(p + 1e-10) (negative entropy, higher = surer).
  """
  z = np.asarray(logits, dtype=np.float64)
  if temperature > 0:
    z = z / temperature
  z = z - z.max(axis=-1, keepdims=True)
  probs = np.exp(z)
  probs /= probs.sum(axis=-1, keepdims=True)
  if top_p is not None and top_p < 1:
    order = np.argsort(-probs, axis=-1)
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum(axis=-1, keepdims=True)
  if alg == "entropy":
    return (probs * np.log(probs + 1e-10)).sum(axis=-1)
  top2 = -np.sort(-probs, axis=-1)[..., :2]
  if alg == "maskgit_plus":
    return top2[..., 0]
  if alg == "topk_margin":
    return top2[..., 0] - top2[..., 1]
  raise ValueError(f"confidence_from_logits: alg={alg!r} is not one of "
                   f"('entropy', 'maskgit_plus', 'topk_margin')")


def confidence_curve(confidence_BxL, valid_BxL=None) -> np.ndarray:
  """Mean confidence at each position of the masked region over a batch, shape [L].

  Feed the step-0 confidence (all of the response masked) to see the entropy sink: an
  L-shaped curve, highest right after the prompt.
  """
  conf = np.asarray(confidence_BxL, dtype=np.float64)
  if conf.ndim == 1:
    conf = conf[None]
  if valid_BxL is not None:
    conf = np.where(np.asarray(valid_BxL, dtype=bool), conf, np.nan)
  return np.nanmean(conf, axis=0)
