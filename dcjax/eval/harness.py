"""The evaluation loop: prompts -> n samples per task -> sandboxed tests -> pass@k.

`generate_fn(prompts, n) -> list[list[str]]` returns, for each prompt, n continuations
(the generated text only, not the prompt; special tokens may be left in, they are cut).
Generation of the next batch of tasks overlaps the execution of the previous one.

Written to `output_dir`:
  {benchmark}_{style}_results.jsonl   one line per task: completions, solutions, results
  {benchmark}_{style}_evalplus.jsonl  {"task_id", "solution"} per sample (EvalPlus format)
  {benchmark}_{style}_summary.json    pass@k and status counts
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
from typing import Callable, Sequence

from tqdm.auto import tqdm

from dcjax.eval.passk import mean_pass_at_k
from dcjax.eval.prompts import PROMPT_STYLES, build_prompt, solution_program
from dcjax.eval.tasks import Task
from dcjax.execution import Result, Sandbox, SandboxConfig

GenerateFn = Callable[[list[str], int], Sequence[Sequence[str]]]


@dataclasses.dataclass
class EvalReport:
  benchmark: str
  prompt_style: str
  n_tasks: int
  n_samples: int
  pass_at_k: dict[str, float]
  status_counts: dict[str, int]
  per_task: list[dict]
  paths: dict[str, str]

  def summary(self) -> dict:
    return {"benchmark": self.benchmark, "prompt_style": self.prompt_style,
            "n_tasks": self.n_tasks, "n_samples": self.n_samples, **self.pass_at_k,
            "status_counts": self.status_counts}

  def table(self) -> str:
    """A small fixed-width table with pass@k in percent."""
    ks = list(self.pass_at_k)
    head = ["benchmark", "style", "tasks", "n", *ks]
    row = [self.benchmark, self.prompt_style, str(self.n_tasks), str(self.n_samples),
           *[f"{100 * self.pass_at_k[k]:.1f}" for k in ks]]
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return fmt.format(*head) + "\n" + fmt.format(*row)


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


def evaluate(tasks: Sequence[Task], generate_fn: GenerateFn, *, n_samples: int = 1,
             ks: Sequence[int] = (1,), prompt_style: str = "instruct",
             benchmark: str = "custom", output_dir: str | None = None,
             sandbox: SandboxConfig | None = None, batch_size: int = 16,
             progress: bool = True) -> EvalReport:
  """Samples `n_samples` completions per task, runs each against the task's tests in the
  sandbox, and reports unbiased pass@k (for every k <= n_samples)."""
  if prompt_style not in PROMPT_STYLES:
    raise ValueError(f"prompt_style={prompt_style!r} is not one of {PROMPT_STYLES}")
  if n_samples < 1 or batch_size < 1:
    raise ValueError(f"n_samples={n_samples} and batch_size={batch_size} must be >= 1")
  runner = Sandbox(sandbox or SandboxConfig())
  paths: dict[str, str] = {}
  results_file = evalplus_file = None
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, f"{benchmark}_{prompt_style}")
    paths = {"results": stem + "_results.jsonl", "evalplus_samples": stem + "_evalplus.jsonl",
             "summary": stem + "_summary.json"}
    results_file = open(paths["results"], "w", encoding="utf-8")
    evalplus_file = open(paths["evalplus_samples"], "w", encoding="utf-8")

  per_task: list[dict] = []
  statuses: collections.Counter = collections.Counter()
  bar = tqdm(total=len(tasks), desc=f"{benchmark} ({prompt_style})", unit="task",
             disable=not progress)

  def execute(batch: list[Task], completions: list[list[str]]) -> None:
    solutions = [[solution_program(t, c, prompt_style) for c in cs]
                 for t, cs in zip(batch, completions)]
    programs = [t.program(s) for t, ss in zip(batch, solutions) for s in ss]
    results = runner.run_many(programs)
    for j, (task, comps, sols) in enumerate(zip(batch, completions, solutions)):
      mine = results[j * n_samples:(j + 1) * n_samples]
      statuses.update(r.status for r in mine)
      record = {"task_id": task.task_id, "n": n_samples,
                "n_correct": sum(r.passed for r in mine), "completions": comps,
                "solutions": sols, "results": [_result_record(r) for r in mine]}
      per_task.append(record)
      if results_file:
        results_file.write(json.dumps(record) + "\n")
        for sol in sols:
          evalplus_file.write(json.dumps({"task_id": task.task_id, "solution": sol}) + "\n")
    if results_file:
      results_file.flush()
      evalplus_file.flush()
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
  finally:
    bar.close()
    for f in (results_file, evalplus_file):
      if f:
        f.close()

  report = EvalReport(
      benchmark=benchmark, prompt_style=prompt_style, n_tasks=len(per_task),
      n_samples=n_samples,
      pass_at_k=mean_pass_at_k([r["n"] for r in per_task], [r["n_correct"] for r in per_task],
                               ks),
      status_counts=dict(statuses), per_task=per_task, paths=paths)
  if output_dir:
    with open(paths["summary"], "w", encoding="utf-8") as f:
      json.dump(report.summary(), f, indent=2)
  return report
