"""The generated code-task family (dcjax/rl/code_tasks.py) and the code-execution study
(dcjax/rl/code_study.py, benchmarks/grpo_code.py; docs/grpo.md, "Code-execution study")."""

import dataclasses

import jax
import numpy as np
import pytest

from dcjax.eval.prompts import build_prompt, solution_program
from dcjax.execution import Sandbox, SandboxConfig
from dcjax.rl import code_study, code_tasks, prompts, rewards


def test_splits_are_compositional_and_disjoint():
  s = code_tasks.code_splits(seed=0)
  pair = lambda t: (t["template"], t["k"])
  train, held = {pair(t) for t in s.train}, {pair(t) for t in s.heldout}
  assert not train & held
  assert {pair(t) for t in s.sft} < train
  assert len(s.sft) == round(0.5 * len(s.train))
  assert len(held) == len(code_tasks.TEMPLATES) * code_tasks.HELDOUT_PER_TEMPLATE
  # every held-out template and constant is seen in training, never together
  assert {t for t, _ in held} <= {t for t, _ in train}
  assert {k for _, k in held} <= {k for _, k in train}
  assert code_tasks.code_splits(seed=0) == s
  assert code_tasks.code_splits(seed=1).heldout != s.heldout


def test_reference_solutions_pass_and_asserts_discriminate():
  """Every reference passes its asserts in the sandbox; `return <arg>` fails on most tasks
  (the asserts expect different values, so no constant answer passes)."""
  s = code_tasks.code_splits(seed=0)
  tasks = s.train[::7] + s.heldout
  answers = [prompts.fenced_answer(t["solution"]) for t in tasks]
  assert rewards.code_rewards(answers, [t["tests"] for t in tasks]) == [1.0] * len(tasks)
  identity = [prompts.fenced_answer(t["solution"].split("return")[0] + "return "
                                    + t["solution"].split("(")[1].split(")")[0])
              for t in tasks]
  assert np.mean(rewards.code_rewards(identity, [t["tests"] for t in tasks])) < 0.5


def test_harness_answer_is_what_the_eval_harness_runs():
  task = code_tasks.code_splits(seed=0).heldout[0]
  htask = code_study.harness_tasks([task])[0]
  good = prompts.fenced_answer(task["solution"])
  program = solution_program(htask, code_study.harness_answer(good), "instruct")
  assert program == task["solution"].rstrip("\n") + "\n"
  runner = Sandbox(SandboxConfig(timeout_s=5.0))
  assert runner.run_many([htask.program(program)])[0].passed
  # a wrong format gives "" (the harness then runs the docstring stub, which fails), even
  # when the code inside is right
  for bad in (good + "thanks", "Sure:\n" + good.replace("```python", "```"),
              task["solution"]):
    assert code_study.harness_answer(bad) == ""
    stub = solution_program(htask, code_study.harness_answer(bad), "instruct")
    assert not runner.run_many([htask.program(stub)])[0].passed
  assert "Test cases" not in build_prompt(htask, "instruct")  # the harness's own prompt


@pytest.mark.slow
def test_grpo_raises_the_code_reward_beyond_sampling_noise(tmp_path):
  """Shortened study: SFT warm start, then coupled-GRPO on a fixed set of training prompts.
  The sampled code reward on those prompts (sandboxed asserts; a completion only earns it
  with the right format) must rise above the warm start's by more than 3 standard errors of
  the sampling noise, measured here with different sampling keys, and by at least 0.1."""
  cfg = dataclasses.replace(code_study.StudyConfig(), iterations=12, lr=5e-4,
                            eval_samples=8)
  study = code_study.setup(cfg, str(tmp_path), log=lambda m: None)
  pool = np.arange(40, 40 + cfg.num_prompts)
  tasks = [study.splits.train[i] for i in pool]
  ids, mask = (x[pool] for x in study.train_rows)

  def code_reward(params, keys=(0, 1, 2)):
    values = [code_study.sampled_rewards(study, params, ids, mask, tasks,
                                         jax.random.key(500 + k))["code"] for k in keys]
    return float(np.mean(values)), float(np.std(values, ddof=1))

  before, noise_before = code_reward(study.sft_params)
  assert 0.05 < before < 0.9  # the warm start leaves room, and the reward is not all zero
  run = code_study.rl_run(study, code_study.make_learner(study, "coupled"), seed=0,
                          log=lambda m: None, pool=pool, final_eval=False)
  after, noise_after = code_reward(run["params"])
  noise = np.sqrt((noise_before ** 2 + noise_after ** 2) / 3)
  assert after - before > max(0.1, 3 * noise), (before, after, noise)
