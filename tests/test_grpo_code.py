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


def test_slip_fails_every_assert_and_the_teacher_slips_at_its_rate():
  """The careless teacher's slip (one operator or operand order) fails each of its task's
  asserts, the prompt's first assert included, so greedy decoding of a slipping policy scores
  0 on that task; the teacher replaces a demonstration by the slip at `slip_rate`."""
  s = code_tasks.code_splits(seed=0)
  tasks = s.train + s.heldout
  for t in tasks[::5]:
    assert t["slip_solution"] != t["solution"]
    slips = [prompts.fenced_answer(t["slip_solution"])] * len(t["tests"])
    assert rewards.code_rewards(slips, [[a] for a in t["tests"]]) == [0.0] * len(t["tests"])
  demos = code_tasks.teacher_demos(s.sft, slip_rate=0.6, copies=4, seed=3)
  assert len(demos) == 4 * len(s.sft)
  slipped = np.mean([d["solution"] == d["slip_solution"] for d in demos])
  assert abs(slipped - 0.6) < 4 * np.sqrt(0.6 * 0.4 / len(demos)), slipped
  assert code_tasks.teacher_demos(s.sft, slip_rate=0.0, copies=2) == [t for t in s.sft
                                                                       for _ in range(2)]


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
def test_grpo_raises_heldout_pass_rates_beyond_chance(tmp_path):
  """Shortened study (one seed, 8 of the benchmark's 16 iterations): from the careless
  teacher's warm start, coupled-GRPO on the training prompts must raise, on the held-out
  pairs that RL never sees,
  * greedy pass@1 through the eval harness by at least 0.1: 3.6 x the seed-to-seed std of
    the benchmark's coupled runs (0.028; the benchmark's three seeds rose by 0.19-0.31 at
    iteration 8), and
  * the mean code reward of sampled completions (asserts run in the sandbox, so format
    alone earns nothing) by more than 3 standard errors of its sampling noise, estimated
    from the spread of each task's samples."""
  cfg = dataclasses.replace(code_study.StudyConfig(), iterations=8)
  study = code_study.setup(cfg, str(tmp_path), log=lambda m: None)
  n = cfg.eval_samples
  assert cfg.slip_rate > 0.5 and n >= 4

  def heldout(params):
    pass1 = code_study.heldout_eval(study, params, jax.random.key(0), sampled=False)["pass1"]
    texts = code_study.sample_texts(study, params, *study.heldout_rows, n, None,
                                    jax.random.key(500))
    tests = [t["tests"] for t in study.splits.heldout for _ in range(n)]
    code_TxN = np.asarray(rewards.code_rewards(texts, tests)).reshape(-1, n)
    # the task means' noise: each task's sample variance over n draws, n draws per task
    se = np.sqrt(np.sum(code_TxN.var(axis=1, ddof=1) / n)) / len(code_TxN)
    return pass1, float(code_TxN.mean()), float(se)

  pass_before, before, se_before = heldout(study.sft_params)
  assert pass_before < 0.5  # the warm start leaves room
  run = code_study.rl_run(study, code_study.make_learner(study, "coupled"), seed=0,
                          log=lambda m: None, final_eval=False)
  pass_after, after, se_after = heldout(run["params"])
  assert pass_after - pass_before >= 0.1, (pass_before, pass_after)
  noise = np.hypot(se_before, se_after)
  assert after - before > 3 * noise, (before, after, noise)
