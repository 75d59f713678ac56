"""The grpo mode end to end on one device: metrics, checkpoint and exact resume, configs."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

from dcjax import config as config_lib
from dcjax.parallel.mesh import make_mesh
from dcjax.modes import grpo as loop
from dcjax.rl.reward_worker import RewardResult
from tests.trees import assert_trees_equal


def tiny(workdir_steps=2):
  c = importlib.import_module("configs.grpo_tiny").get_config()
  c.model.update(dict(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                      head_dim=16))
  c.rl.update(dict(steps=workdir_steps, num_prompts=2, num_generations=4, log_completions=0))
  c.sampler.update(dict(max_new_tokens=8, steps=8))
  c.prompts.update(dict(synthetic_tasks=12))
  c.warm_start.steps = 0
  c.checkpoint.update(dict(interval=1, keep=2, async_save=False))
  return c


def reward_fn(host, tasks):
  assert len(tasks) == host.completion_BxN.shape[0] // host.group_size
  frac = (host.completion_BxN == 9).mean(axis=1)
  return RewardResult(total=frac, per_name={"nines": frac})


@pytest.mark.slow
def test_loop_metrics_checkpoint_and_resume(tmp_path):
  workdir = str(tmp_path)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  c = tiny()
  config_lib.validate(c)
  first = loop.train_grpo(c, workdir, reward_fn=reward_fn, mesh=mesh)
  assert len(first["history"]) == 2 and first["stopped"] == "completed"
  assert int(first["state"].step) == 2 * c.rl.num_iterations
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2]
  for key in ("reward", "reward/nines", "zero_variance_groups", "completion_length",
              "clip_fraction", "kl", "entropy", "local_arness", "global_arness", "rollout_s",
              "reward_s", "update_s", "rollout_share", "update_share"):
    assert np.isfinite(records[-1][f"grpo/{key}"]), key

  # A rerun restores the last checkpoint (nothing left to do): same state, same data position;
  # a record a crashed run wrote past that checkpoint is dropped, not kept twice.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 3, "grpo/reward": 0.0}) + "\n")
  second = loop.train_grpo(c, workdir, reward_fn=reward_fn, mesh=mesh)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  assert second["history"] == []
  assert_trees_equal(second["state"], first["state"])
  np.testing.assert_array_equal(next(first["iterator"])["index"],
                                next(second["iterator"])["index"])


def test_configs_validate_and_name_fields():
  config_lib.validate(importlib.import_module("configs.grpo_tiny").get_config())
  big = importlib.import_module("configs.grpo_diffucoder_7b").get_config()
  assert big.rl.num_generations == 10 and big.optim.lr == 1e-6 and big.rl.beta == 0.01
  with pytest.raises(ValueError, match=r"config\.prompts\.path"):
    config_lib.validate(big)
  big.prompts.path = "acecode_hard.jsonl"
  with pytest.raises(ValueError, match=r"config\.hf_dir"):
    config_lib.validate(big)
