"""The jitted learner: sharded (8 host devices) equals unsharded, mu = 1 ratio is exactly 1,
old/current estimates agree under one key, the reference refresh copies, and RL raises a
cheap deterministic reward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.config import base_config
from dcjax.model import ModelConfig
from dcjax import model as model_lib
from dcjax.parallel.mesh import make_mesh
from dcjax.rl import grpo_config, iteration, learner as learner_lib, logprobs
from dcjax.rl.loss import PolicyLossConfig
from dcjax.rl.reward_worker import RewardResult, RewardWorker
from dcjax.train import optim
from tests.trees import assert_trees_close, assert_trees_equal

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10_000.0,
                  mask_token_id=63, pad_token_id=0, eos_token_id=1)
MASK = CFG.mask_token_id


def make_learner(mesh=None, *, lr=1e-3, beta=0.04, micro_batches=1, kind="coupled"):
  section = grpo_config.add_grpo_sections(base_config()).optim
  section.update(lr=lr, grad_clip=1.0)
  tx, schedule = optim.make_optimizer(section, 100)
  cfg = learner_lib.LearnerConfig(estimator=logprobs.EstimatorConfig(kind),
                                  loss=PolicyLossConfig(0.2, 0.2, beta),
                                  micro_batches=micro_batches)
  return learner_lib.Learner(CFG, cfg, tx, schedule, mask_id=MASK, mesh=mesh)


def random_batch(b=8, p=5, n=6, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, 60, (b, p + n)).astype(np.int32)
  comp_mask = np.ones((b, n), bool)
  comp_mask[0, 3:] = False
  comp_mask[5, 1:] = False
  return dict(tokens_BxL=tokens, keep_BxL=np.ones((b, p + n), bool),
              completion_mask_BxN=comp_mask,
              advantages_B=rng.normal(size=b).astype(np.float32))


@pytest.mark.slow
def test_sharded_update_equals_unsharded():
  params = model_lib.init_params(CFG, jax.random.key(0))
  batch = random_batch()
  key = jax.random.key(11)

  batch["ref_logp_BxN"] = np.random.default_rng(1).normal(-3.0, 0.5, (8, 6)).astype(np.float32)
  plain = make_learner()
  state = plain.init_state(jax.tree.map(jnp.copy, params), seed=0)
  state, m_plain = plain.update(state, batch, key)

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = make_learner(mesh)
  sh_params = jax.device_put(params, model_lib.param_shardings(CFG, mesh))
  s_state = sharded.init_state(sh_params, seed=0)
  s_state, m_sh = sharded.update(s_state, batch, key)
  assert s_state.params["embed_tokens"]["embedding"].sharding.spec != jax.sharding.PartitionSpec()

  # One AdamW step moves each weight by about lr = 1e-3; the layouts agree far below that.
  assert_trees_close(s_state.params, state.params, rtol=1e-4, atol=2e-5)
  for name in ("loss", "kl", "grad_norm", "entropy"):
    np.testing.assert_allclose(float(m_sh[name]), float(m_plain[name]), rtol=1e-5)
  # mu = 1 (no old estimate): the ratio is exactly 1, nothing clipped
  assert float(m_plain["ratio"]) == 1.0 and float(m_plain["clip_fraction"]) == 0.0
  assert float(m_plain["kl"]) > 0


@pytest.mark.slow
def test_rl_raises_target_token_reward():
  """Reward = fraction of completion tokens equal to TARGET; rises clearly in ~30 steps.

  Also: the old estimate (scored before the updates) and the current one (inside the first
  update) use the same key, so the first iteration's ratio is 1; with two micro-batches;
  the reference is hard-copied every 10 optimiser steps.
  """
  target, g, prompts, n = 7, 8, 4, 8

  def reward_fn(host, tasks):
    del tasks
    frac = (host.completion_BxN == target).mean(axis=1)
    return RewardResult(total=frac, per_name={"target": frac})

  lrn = make_learner(lr=3e-3, beta=0.01, micro_batches=2)
  state = lrn.init_state(model_lib.init_params(CFG, jax.random.key(2)), seed=0)
  cfg = iteration.IterationConfig(
      group_size=g, num_iterations=2, ref_update_every=10, end_id=-1,
      sampler_kwargs=dict(max_new_tokens=n, steps=n, alg="entropy", temperature=1.2,
                          top_p=0.95))
  prompt_ids = np.random.default_rng(0).integers(2, 60, (prompts, 4)).astype(np.int32)
  prompt_mask = np.ones_like(prompt_ids, bool)
  rewards = []
  with RewardWorker() as worker:
    for step in range(30):
      state, m, _ = iteration.grpo_iteration(lrn, state, prompt_ids, prompt_mask,
                                             [None] * prompts, reward_fn,
                                             jax.random.key(100 + step), cfg, worker)
      rewards.append(m["reward"])
      assert m["completion_length"] == n and 0 <= m["local_arness"] <= 1
      np.testing.assert_allclose(m["ratio_first_iteration"], 1.0, atol=1e-6)
  first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
  assert last > first + 0.25, rewards
  assert int(state.step) == 60  # a multiple of 10: the reference was just refreshed
  assert_trees_equal(state.ref_params, state.params)
