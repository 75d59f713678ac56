"""Rewards of a rollout on the host, in a background thread that overlaps device work.

A reward function is `fn(rollout: HostRollout, tasks: list[dict]) -> RewardResult`, where
`tasks[i]` is the task of the i-th host-local prompt (row r belongs to prompt r // G).
`TextReward` is the default: it decodes each completion up to and including the first
chat end (special tokens stripped) and sums the registered text rewards of
`dcjax.rl.rewards` with weights (docs/rewards.md: 2.0 code + 0.5 format), asserts run in the sandbox
pool. `RewardWorker` runs it on one thread while the main thread dispatches the old and
reference log-prob passes to the device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Callable, Mapping

import numpy as np

from dcjax.execution import SandboxConfig
from dcjax.rl import rewards as rewards_lib
from dcjax.rl.rollout import HostRollout


@dataclasses.dataclass
class RewardResult:
  total: np.ndarray                       # [B] weighted sum
  per_name: dict[str, np.ndarray]         # each [B], unweighted
  texts: list[str] | None = None          # decoded completions, when there are any


RewardFn = Callable[[HostRollout, list], RewardResult]


def decode_completions(tokenizer, rollout: HostRollout) -> list[str]:
  """Each completion's valid tokens (up to the first chat end) decoded, specials stripped."""
  return [tokenizer.decode(row[mask].tolist(), skip_special_tokens=True)
          for row, mask in zip(rollout.completion_BxN, rollout.completion_mask_BxN)]


class TextReward:
  """Decode + weighted registered rewards (default code 2.0, format 0.5)."""

  def __init__(self, tokenizer, weights: Mapping[str, float] | None = None, *,
               timeout_s: float = rewards_lib.ASSERT_TIMEOUT_S, workers: int | None = None):
    self.tokenizer = tokenizer
    self.weights = dict(rewards_lib.DEFAULT_WEIGHTS if weights is None else weights)
    for name in self.weights:
      rewards_lib.get_reward(name)  # fail early on an unknown name
    self.sandbox = SandboxConfig(timeout_s=float(timeout_s), workers=workers or None)

  def __call__(self, rollout: HostRollout, tasks) -> RewardResult:
    texts = decode_completions(self.tokenizer, rollout)
    tests = [list(tasks[i]["tests"]) for i in rollout.prompt_index_B]
    breakdown = rewards_lib.compute_rewards(texts, tests, self.weights, sandbox=self.sandbox)
    return RewardResult(total=breakdown.total, per_name=breakdown.per_name, texts=texts)


class RewardWorker:
  """One background thread; `submit` returns a future of (RewardResult, seconds)."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dcjax-rewards")

  def submit(self, fn: RewardFn, rollout: HostRollout, tasks) -> concurrent.futures.Future:
    def timed():
      start = time.perf_counter()
      result = fn(rollout, tasks)
      return result, time.perf_counter() - start
    return self._pool.submit(timed)

  def close(self) -> None:
    self._pool.shutdown(wait=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
