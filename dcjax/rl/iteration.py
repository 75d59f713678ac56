"""One coupled-GRPO iteration: rollout -> rewards (overlapped) -> advantages -> mu updates.

    rollout (device)  ->  tokens to host  ->  rewards on the worker thread ----------.
                                         \\->  old / reference log-probs (device)     |
                                                                  advantages  <------'
                                                                  mu updates (device),
                                                                  reference refresh

Timings: rollout_s (sampling until tokens are on the host), score_s (old/reference passes),
reward_s (the worker's wall time), reward_wait_s (what the main thread still waited for
the rewards after scoring: the part not hidden behind device work), update_s, step_s.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from dcjax.eval import arness
from dcjax.rl import advantages as adv_lib
from dcjax.rl import rollout as rollout_lib
from dcjax.rl.learner import Learner, RLState
from dcjax.rl.reward_worker import RewardFn, RewardResult, RewardWorker
from dcjax.train.reporting import NonFiniteLossError


@dataclasses.dataclass(frozen=True)
class IterationConfig:
  """Host-side settings of an iteration (the learner holds the jitted ones)."""

  group_size: int
  num_iterations: int = 2
  advantage: str = "mean"
  scale_rewards: bool = False
  ref_update_every: int = 64
  sampler_kwargs: dict = dataclasses.field(default_factory=dict)
  end_id: int = -1
  arness_k: int = 1


def _global(x: np.ndarray) -> np.ndarray:
  """All hosts' rows (only needed for metrics on multi-host runs)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def grpo_iteration(learner: Learner, state: RLState, prompt_ids_BxP, prompt_mask_BxP, tasks,
                   reward_fn: RewardFn, key, cfg: IterationConfig,
                   worker: RewardWorker) -> tuple[RLState, dict, RewardResult]:
  """Runs one rollout batch through mu policy iterations; returns (state, metrics, rewards).

  `tasks[i]` is the task of host-local prompt row i (passed to `reward_fn`).
  """
  mesh = learner.mesh
  start = time.perf_counter()
  k_roll, k_mask = jax.random.split(key)
  ro = rollout_lib.rollout(learner.model_config, state.params, prompt_ids_BxP, prompt_mask_BxP,
                           group_size=cfg.group_size, sampler_kwargs=cfg.sampler_kwargs,
                           rng=k_roll, end_id=cfg.end_id, mesh=mesh)
  host = rollout_lib.to_host_rollout(ro, cfg.group_size, mesh)
  t_rollout = time.perf_counter()

  future = worker.submit(reward_fn, host, tasks)
  batch = dict(tokens_BxL=ro.tokens_BxL, keep_BxL=ro.keep_BxL,
               completion_mask_BxN=ro.completion_mask_BxN)
  keys = [jax.random.fold_in(k_mask, i) for i in range(cfg.num_iterations)]
  olds = ([learner.score(state.params, batch, k) for k in keys]
          if cfg.num_iterations > 1 else [None] * cfg.num_iterations)
  refs = ([learner.score(state.ref_params, batch, k) for k in keys]
          if learner.cfg.uses_reference else [None] * cfg.num_iterations)
  jax.block_until_ready((olds, refs))
  t_score = time.perf_counter()

  result, reward_s = future.result()
  t_rewards = time.perf_counter()
  adv_B = adv_lib.group_advantages(result.total, cfg.group_size, cfg.advantage,
                                   cfg.scale_rewards)
  batch["advantages_B"] = rollout_lib.to_global(adv_B, mesh)

  step_metrics = []
  for i in range(cfg.num_iterations):
    b = dict(batch)
    if olds[i] is not None:
      b["old_logp_BxN"] = olds[i]
    if refs[i] is not None:
      b["ref_logp_BxN"] = refs[i]
    state, m = learner.update(state, b, keys[i])
    step_metrics.append(m)
    done = int(jax.device_get(state.step))
    if cfg.ref_update_every and done % cfg.ref_update_every == 0:
      state = learner.refresh_reference(state)
  step_metrics = jax.device_get(step_metrics)
  t_update = time.perf_counter()

  if any(bool(m["nonfinite"]) for m in step_metrics):
    raise NonFiniteLossError(f"non-finite loss or gradient norm: {step_metrics}")
  metrics = _metrics(host, result, adv_B, step_metrics, cfg)
  step_s = t_update - start
  metrics.update(
      rollout_s=t_rollout - start, score_s=t_score - t_rollout, reward_s=reward_s,
      reward_wait_s=t_rewards - t_score, update_s=t_update - t_rewards, step_s=step_s,
      rollout_share=(t_rollout - start) / step_s,
      update_share=(t_score - t_rollout + t_update - t_rewards) / step_s,
      reward_wait_share=(t_rewards - t_score) / step_s)
  return state, metrics, result


def _metrics(host, result: RewardResult, adv_B, step_metrics, cfg: IterationConfig) -> dict:
  total = _global(np.asarray(result.total, np.float64))
  m = dict(reward=float(total.mean()), reward_std=float(total.std()),
           zero_variance_groups=adv_lib.zero_variance_fraction(total, cfg.group_size),
           advantage_abs=float(np.abs(_global(adv_B)).mean()))
  for name, values in result.per_name.items():
    m[f"reward/{name}"] = float(_global(np.asarray(values, np.float64)).mean())
  lengths = _global(host.completion_mask_BxN.sum(axis=1).astype(np.float64))
  m["completion_length"] = float(lengths.mean())
  m["local_arness"] = arness.local_arness(host.reveal_step_BxN, cfg.arness_k)
  m["global_arness"] = arness.global_arness(host.reveal_step_BxN, cfg.arness_k)
  for name in ("loss", "clip_fraction", "kl", "ratio", "entropy", "grad_norm"):
    m[name] = float(np.mean([float(s[name]) for s in step_metrics]))
  # The first update sees the old estimate under the same params and key: exactly 1 up to
  # float rounding (a check that old and current estimates share their masks).
  m["ratio_first_iteration"] = float(step_metrics[0]["ratio"])
  m["lr"] = float(step_metrics[-1]["lr"])
  return m
