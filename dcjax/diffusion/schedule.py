"""Reveal schedules of the parallel-unmasking sampler, computed on the host (docs/sampler.md).

Everything here is numpy and runs before the jitted loop: the per-step reveal counts and
reveal probabilities become arrays the compiled program reads, so a new prompt of the same
shape never recompiles.

Float32 arithmetic follows Dream's torch code bit for bit:
* `timesteps = torch.linspace(1, eps, steps + 1)`: float32 step `(end - start) / (n - 1)`,
  the first half `start + i * step`, the second half `end - (n - 1 - i) * step`, each value
  rounded once (torch's CPU kernel and CUDA's fused multiply-add agree on this).
* `k = int(num_masked * (1 - s / t))` with `num_masked = count / batch` in float32, and
  `k = int(num_masked)` at the last step.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "random")

_F32 = np.float32


def dream_timesteps(steps: int, eps: float = 1e-3) -> np.ndarray:
  """`torch.linspace(1, eps, steps + 1)` in float32, exactly: float32 [steps + 1]."""
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  n = steps + 1
  start, end = _F32(1.0), _F32(eps)
  step = _F32((end - start) / _F32(n - 1))
  i = np.arange(n, dtype=np.float64)
  # One rounding from the exact value (float64 holds start + i * step exactly here).
  head = (np.float64(start) + np.float64(step) * i).astype(_F32)
  tail = (np.float64(end) - np.float64(step) * (n - 1 - i)).astype(_F32)
  return np.where(np.arange(n) < n // 2, head, tail).astype(_F32)


def transfer_probabilities(steps: int, eps: float = 1e-3) -> np.ndarray:
  """`origin`: probability `1 - s / t` that a masked position is revealed at each step
  (float32, 1 at the last step): float32 [steps]."""
  ts = dream_timesteps(steps, eps)
  p = (_F32(1.0) - ts[1:] / ts[:-1]).astype(_F32)
  p[-1] = _F32(1.0)
  return p


def dream_reveal_counts(num_masked_per_row: Sequence[int] | int, steps: int,
                        eps: float = 1e-3) -> np.ndarray:
  """Confidence algorithms: Dream's count k per step, int32 [steps].

  `num_masked_per_row` holds each row's initial number of masked positions (an int means
  one row). k is computed from the batch-average masked count; each row then reveals
  `min(k, its masked count)` (dcjax never re-masks), which this simulation follows.
  At the last step every row reveals all its remaining masks: Dream's `int(average)` leaves
  masks in rows that started with more than the average (only infilling canvases differ
  between rows; with equal rows both are the same number).
  """
  masked = np.atleast_1d(np.asarray(num_masked_per_row, dtype=np.int64)).copy()
  if masked.ndim != 1 or (masked < 0).any():
    raise ValueError(f"num_masked_per_row={num_masked_per_row!r} must be non-negative counts")
  ts = dream_timesteps(steps, eps)
  counts = np.zeros(steps, np.int32)
  for i in range(steps):
    average = _F32(masked.sum()) / _F32(masked.shape[0])
    if i < steps - 1:
      k = int(_F32(average * _F32(_F32(1.0) - _F32(ts[i + 1] / ts[i]))))
    else:  # Dream: int(average); dcjax: every row's remaining masks (see the docstring)
      k = max(int(average), int(masked.max()))
    counts[i] = k
    masked -= np.minimum(masked, k)
  return counts


def block_reveal_counts(block_masked: int, steps_in_block: int) -> np.ndarray:
  """LLaDA: `base = masked // steps`, the first `masked % steps` steps one more: int32."""
  if steps_in_block < 1:
    raise ValueError(f"steps per block={steps_in_block} must be >= 1")
  base, remainder = divmod(int(block_masked), steps_in_block)
  counts = np.full(steps_in_block, base, np.int32)
  counts[:remainder] += 1
  return counts


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The per-step arrays the jitted loop reads (length T = number of steps).

  block_of_step   int32 [T]  which block of `block_length` positions step i refines
  reveal_count    int32 [T]  confidence algorithms: positions revealed per row
  transfer_prob   float32 [T]  `origin`: reveal probability of each masked position
  refresh         bool [T]  block KV cache: recompute the whole canvas at this step
  """

  block_of_step: np.ndarray
  reveal_count: np.ndarray
  transfer_prob: np.ndarray
  refresh: np.ndarray
  num_blocks: int
  block_length: int
  steps_per_block: int

  @property
  def num_steps(self) -> int:
    return int(self.block_of_step.shape[0])


def _refresh_flags(steps_per_block: int, num_blocks: int, refresh_every: int) -> np.ndarray:
  j = np.tile(np.arange(steps_per_block), num_blocks)
  if refresh_every > 0:
    return (j % refresh_every) == 0
  return j == 0


def build_schedule(max_new_tokens: int, steps: int, *, block_length: int | None = None,
                   eps: float = 1e-3, threshold: float | None = None,
                   cache_refresh_every: int = 0,
                   num_masked_per_row: Sequence[int] | None = None) -> Schedule:
  """Host arrays for `generate`.

  * No blocks: Dream's schedule over the whole completion (`steps` steps), computed from
    `num_masked_per_row` (every mask of each row's canvas, for infilling; default: each row
    has `max_new_tokens`).
  * `block_length`: `steps / num_blocks` steps per block; LLaDA counts per block, and for
    `origin` Dream's probabilities over each block's own `linspace(1, eps, spb + 1)`.
  * `threshold`: steps are data dependent (at most one step per generated token); the
    arrays then have length `max_new_tokens` and only `refresh` for the first steps of
    the first block is meaningful (the loop derives the rest).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  bl = max_new_tokens if block_length is None else int(block_length)
  if bl < 1 or max_new_tokens % bl:
    raise ValueError(f"block_length={block_length} must be positive and divide "
                     f"max_new_tokens={max_new_tokens}")
  num_blocks = max_new_tokens // bl
  if threshold is not None:
    t = max_new_tokens
    zeros = np.zeros(t, np.int32)
    return Schedule(block_of_step=zeros, reveal_count=zeros, transfer_prob=np.zeros(t, _F32),
                    refresh=np.zeros(t, bool), num_blocks=num_blocks, block_length=bl,
                    steps_per_block=bl)
  if steps < 1 or steps % num_blocks:
    raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks "
                     f"({num_blocks} = max_new_tokens {max_new_tokens} / block_length {bl})")
  spb = steps // num_blocks
  if block_length is None:
    masked = max_new_tokens if num_masked_per_row is None else num_masked_per_row
    counts = dream_reveal_counts(masked, steps, eps)
  else:
    counts = np.tile(block_reveal_counts(bl, spb), num_blocks)
  return Schedule(
      block_of_step=np.repeat(np.arange(num_blocks, dtype=np.int32), spb),
      reveal_count=counts.astype(np.int32),
      transfer_prob=np.tile(transfer_probabilities(spb, eps), num_blocks),
      refresh=_refresh_flags(spb, num_blocks, cache_refresh_every),
      num_blocks=num_blocks, block_length=bl, steps_per_block=spb)
