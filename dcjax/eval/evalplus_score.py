"""HumanEval+ / MBPP+ scored by EvalPlus itself (docs/evaluation.md, "Scoring").

`evalplus.evaluate` (the pip extra `evalplus`, pinned to 0.3.1) runs each solution on the
task's base inputs and then on its plus inputs and compares the outputs with the canonical
solution's (EvalPlus's float tolerance, special oracles and MBPP+ input deserialisation).
Each input gets its own time limit, max(min_time_limit, gt_time_limit_factor x the canonical
solution's time on that input); a solution over it fails that input.

It runs in a child interpreter: evalplus reads its dataset override ($HUMANEVAL_OVERRIDE_PATH
/ $MBPP_OVERRIDE_PATH) and its cache directory when it is imported, forks worker processes
(not safe from a process that holds JAX's threads), and leaves a 20-second watchdog thread
behind that would hold an interpreter's exit. Where the package or its data file is absent
the harness keeps dcjax's differential checker (`tasks.load_evalplus`), labelled
"approximate".

    scorer = EvalPlusScorer("humaneval_plus", data_path=default_data_path("humaneval_plus"))
    outcomes = scorer.score("run_samples.jsonl", task_ids, work_dir)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from typing import Sequence

# benchmark -> (evalplus's dataset name, its override variable, the file evalplus 0.3.1
# downloads into its cache directory).
DATASETS = {
    "humaneval_plus": ("humaneval", "HUMANEVAL_OVERRIDE_PATH", "HumanEvalPlus-v0.1.10.jsonl"),
    "mbpp_plus": ("mbpp", "MBPP_OVERRIDE_PATH", "MbppPlus-v0.2.0.jsonl"),
}
SCORERS = ("auto", "evalplus", "approximate")
PASS = "pass"  # evalplus's status strings: "pass", "fail", "timeout"

# The child: evalplus.evaluate on a samples file, then out without waiting for its watchdog.
_CHILD = """\
import json, os, sys, traceback
try:
  from evalplus.evaluate import evaluate
  evaluate(**json.loads(sys.argv[1]))
  code = 0
except BaseException:
  traceback.print_exc()
  code = 1
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def installed() -> bool:
  return importlib.util.find_spec("evalplus") is not None


def cache_dir() -> str:
  """Where evalplus keeps downloaded data and ground truths ($XDG_CACHE_HOME/evalplus)."""
  from appdirs import user_cache_dir  # an evalplus dependency
  return user_cache_dir("evalplus")


def default_data_path(benchmark: str) -> str:
  """The EvalPlus data file evalplus would read without downloading: its override variable
  when set, else its cached download; "" when neither exists (or evalplus is absent)."""
  if benchmark not in DATASETS or not installed():
    return ""
  _, variable, cached = DATASETS[benchmark]
  for path in (os.environ.get(variable, ""), os.path.join(cache_dir(), cached)):
    if path and os.path.isfile(path):
      return path
  return ""


def resolve_scorer(benchmark: str, scorer: str, data_path: str) -> str:
  """"sandbox" (HumanEval / MBPP: the dataset's own tests), "evalplus" or "approximate".

  `scorer` is one of SCORERS: "auto" takes evalplus when it is installed and `data_path`
  (an EvalPlus-format file) exists, "approximate" otherwise.
  """
  if scorer not in SCORERS:
    raise ValueError(f"scorer={scorer!r} is not one of {SCORERS}")
  if benchmark not in DATASETS:
    if scorer == "evalplus":
      raise ValueError(f"scorer='evalplus' scores {sorted(DATASETS)}, not {benchmark!r} "
                       f"(their base tests are HumanEval's / MBPP's)")
    return "sandbox"
  if scorer == "approximate":
    return "approximate"
  ready = installed() and bool(data_path) and os.path.isfile(data_path)
  if scorer == "evalplus" and not ready:
    raise ValueError(
        f"scorer='evalplus' for {benchmark!r} needs the evalplus package "
        f"(pip install --no-deps evalplus==0.3.1, see setup.cfg's `evalplus` extra; "
        f"installed: {installed()}) and an EvalPlus data file (data_path={data_path!r})")
  return "evalplus" if ready else "approximate"


def write_subset(data_path: str, task_ids: Sequence[str], out_path: str) -> str:
  """Copies the records of `task_ids` from an EvalPlus data file, unchanged, to `out_path`.

  evalplus refuses a samples file that lacks any of its dataset's tasks; a `limit` run is
  scored against this subset instead (its ground truth is cached under its own hash).
  """
  wanted, found = set(task_ids), set()
  with open(data_path, encoding="utf-8") as src, open(out_path, "w", encoding="utf-8") as dst:
    for line in src:
      if line.strip() and json.loads(line)["task_id"] in wanted:
        found.add(json.loads(line)["task_id"])
        dst.write(line if line.endswith("\n") else line + "\n")
  missing = wanted - found
  if missing:
    raise ValueError(f"{data_path} lacks task(s) {sorted(missing)[:5]}")
  return out_path


@dataclasses.dataclass(frozen=True)
class EvalPlusScorer:
  """Runs `evalplus.evaluate` on a samples file ({"task_id", "solution"} lines).

  Attributes:
    benchmark: "humaneval_plus" or "mbpp_plus".
    data_path: the EvalPlus-format data file (handed to evalplus through its override).
    min_time_limit: seconds; the least time limit of any input (evalplus's default 1.0).
    gt_time_limit_factor: an input's limit in multiples of the canonical solution's time on
      it (evalplus's default 4.0).
    workers: evalplus's `parallel` (processes); 0 = half the host's CPUs, at most 8.
    timeout_s: limit for the whole evalplus run; None = none.
  """

  benchmark: str
  data_path: str
  min_time_limit: float = 1.0
  gt_time_limit_factor: float = 4.0
  workers: int = 0
  timeout_s: float | None = None

  def score(self, samples_path: str, task_ids: Sequence[str],
            work_dir: str) -> dict[str, list[dict]]:
    """{task_id: one outcome per sample, in the samples file's order}; an outcome has
    base_status, plus_status ("pass" / "fail" / "timeout"), base_fail_tests and
    plus_fail_tests (the failing input, as text, cut to 300 characters).

    When `task_ids` is not the whole data file, a subset of it is written into `work_dir`
    and scored instead (evalplus requires a sample for every task of its dataset).
    """
    if not samples_path.endswith(".jsonl"):
      raise ValueError(f"evalplus reads a .jsonl samples file, got {samples_path}")
    dataset, variable, _ = DATASETS[self.benchmark]
    data_path = self.data_path
    if set(task_ids) != _task_ids(data_path):
      name = os.path.basename(samples_path)[:-len(".jsonl")] + "_dataset.jsonl"
      data_path = write_subset(data_path, task_ids, os.path.join(work_dir, name))
    result_path = samples_path.replace(".jsonl", "_eval_results.json")  # evalplus's name
    if os.path.exists(result_path):  # evalplus would reuse it instead of scoring
      os.remove(result_path)
    workers = self.workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    args = {"dataset": dataset, "samples": samples_path, "parallel": workers,
            "min_time_limit": float(self.min_time_limit),
            "gt_time_limit_factor": float(self.gt_time_limit_factor)}
    env = {**os.environ, variable: os.path.abspath(data_path)}
    try:
      proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], env=env,
                            capture_output=True, text=True, timeout=self.timeout_s,
                            check=False)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"evalplus.evaluate on {samples_path} ran past "
                         f"{self.timeout_s} s") from e
    if proc.returncode != 0 or not os.path.exists(result_path):
      raise RuntimeError(f"evalplus.evaluate on {samples_path} (dataset {dataset}, "
                         f"{variable}={data_path}) failed with exit status "
                         f"{proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(result_path, encoding="utf-8") as f:
      per_task = json.load(f)["eval"]
    return {task_id: [_outcome(r) for r in rows] for task_id, rows in per_task.items()}


def _task_ids(path: str) -> set[str]:
  with open(path, encoding="utf-8") as f:
    return {json.loads(line)["task_id"] for line in f if line.strip()}


def _outcome(row: dict) -> dict:
  return {"base_status": row["base_status"], "plus_status": row["plus_status"],
          "base_fail_tests": [repr(t)[:300] for t in row.get("base_fail_tests") or []],
          "plus_fail_tests": [repr(t)[:300] for t in row.get("plus_fail_tests") or []]}


def sample_status(outcome: dict) -> str:
  """One status for a sample: "passed" (base and plus), else "base_<status>" when the
  base tests did not pass, else "plus_<status>"."""
  if outcome["base_status"] != PASS:
    return f"base_{outcome['base_status']}"
  if outcome["plus_status"] != PASS:
    return f"plus_{outcome['plus_status']}"
  return "passed"
