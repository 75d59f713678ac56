"""Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), averaged over tasks."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Probability that at least one of k samples drawn from n (c correct) is correct.

  Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which equals
  1 - C(n - c, k) / C(n, k) without big binomials.
  """
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int],
                   ks: Sequence[int]) -> dict[str, float]:
  """{"pass@k": mean over tasks} for every k not larger than the smallest n."""
  if len(num_samples) != len(num_correct):
    raise ValueError(f"mean_pass_at_k: {len(num_samples)} sample counts but "
                     f"{len(num_correct)} correct counts")
  if not len(num_samples):
    return {}
  out = {}
  for k in ks:
    if k <= min(num_samples):
      out[f"pass@{k}"] = float(np.mean(
          [pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)]))
  return out
