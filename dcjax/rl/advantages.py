"""Group-relative advantages (docs/grpo.md), on the host in numpy.

Rewards come as a flat [B] vector whose rows are grouped by prompt: rows g*G .. g*G+G-1
are the G completions of prompt g (the layout `rollout` produces).

  mean: A_i = r_i - mean_j r_j                       (the paper's headline run; default)
  loo:  A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean)   (the released code)
  scale: optionally divide by the group's sample std (ddof=1) + 1e-4.
"""

from __future__ import annotations

import numpy as np

BASELINES = ("mean", "loo")
STD_EPS = 1e-4


def _groups(rewards_B, group_size: int) -> np.ndarray:
  r = np.asarray(rewards_B, np.float64)
  if r.ndim != 1 or group_size < 2 or r.shape[0] % group_size:
    raise ValueError(f"rewards of shape {r.shape} cannot be split into groups of "
                     f"config.rl.num_generations={group_size} (need >= 2 dividing the batch)")
  return r.reshape(-1, group_size)


def group_advantages(rewards_B, group_size: int, baseline: str = "mean",
                     scale: bool = False) -> np.ndarray:
  """Advantages [B] (float32) of grouped rewards."""
  if baseline not in BASELINES:
    raise ValueError(f"config.rl.advantage={baseline!r} is not one of {BASELINES}")
  r_GxK = _groups(rewards_B, group_size)
  mean_Gx1 = r_GxK.mean(axis=1, keepdims=True)
  adv = r_GxK - mean_Gx1
  if baseline == "loo":
    adv = adv * group_size / (group_size - 1)
  if scale:
    adv = adv / (r_GxK.std(axis=1, ddof=1, keepdims=True) + STD_EPS)
  return adv.reshape(-1).astype(np.float32)


def zero_variance_fraction(rewards_B, group_size: int) -> float:
  """Fraction of groups whose rewards are all equal (they give no learning signal)."""
  r_GxK = _groups(rewards_B, group_size)
  return float(np.mean(np.ptp(r_GxK, axis=1) == 0))
