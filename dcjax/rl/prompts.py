"""RL prompt data: tasks, prompt construction (docs/grpo.md) and a checkpointable grain iterator.

A task is {"question": str, "tests": [assert strings], "solution": str or None}. Sources:
  jsonl      AceCode-style records with `question` and a list of asserts in `test_cases`
             (field names configurable);
  mbpp       MBPP records (`text`, `test_list`, `test_setup_code`, `code`) restricted to a
             task-id range (the train split is 601-974);
  synthetic  generated one-line function tasks (dcjax.rl.synthetic).

Prompt: ChatML with the system prompt; user content = question + "\\nTest cases: " + first
assert, unless the question already shows a fenced code stub ("\\n```\\n"); the token ids
are left-truncated to `max_prompt_len` (the start, system turn first, is cut).

The pipeline shuffles task indices (reshuffled each epoch), repeats, takes this host's
share and encodes each prompt into a fixed [max_prompt_len] left-padded row; `collate`
trims a batch to the smallest multiple of `pad_multiple` that holds its longest prompt, so
only a few prompt lengths are ever compiled.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import grain
import numpy as np

from dcjax.data.sources import DataError, read_jsonl
from dcjax.rl import synthetic

STUB_MARK = "\n```\n"


def build_question(question: str, tests: Sequence[str], add_first_test: bool = True) -> str:
  """The user turn's content (docs/grpo.md)."""
  if add_first_test and tests and STUB_MARK not in question:
    return question + "\nTest cases: " + tests[0]
  return question


def prompt_text(tokenizer, task, system_prompt: str | None, add_first_test: bool = True) -> str:
  """The chat-templated prompt; an empty or None `system_prompt` leaves the system turn out."""
  content = build_question(task["question"], task["tests"], add_first_test)
  return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                       add_generation_prompt=True,
                                       system_prompt=system_prompt or None)


def encode_prompt(tokenizer, text: str, max_len: int) -> np.ndarray:
  """Token ids, left-truncated to the last `max_len`."""
  ids = tokenizer.encode(text)
  return np.asarray(ids[-max_len:], np.int32)


def fenced_answer(solution: str) -> str:
  """The completion text a formatted answer has (format reward 1 when `solution` parses)."""
  return "```python\n" + solution.rstrip("\n") + "\n```\n"


# ----------------------------------------------------------------------------- sources


def _read_jsonl(path: str, field: str) -> list[tuple[str, dict]]:
  """("path:line", record) pairs; DataError naming the line for bad UTF-8 or JSON."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{field}={path!r}: no such file")
  return list(read_jsonl(path))


def load_jsonl_tasks(path: str, question_field: str = "question",
                     tests_field: str = "test_cases") -> list[dict]:
  """AceCode-style JSONL -> tasks (records without a question or asserts are dropped)."""
  tasks = []
  for where, rec in _read_jsonl(path, "config.prompts.path"):
    if question_field not in rec or tests_field not in rec:
      raise DataError(f"{where}: record lacks {question_field!r} "
                      f"(config.prompts.question_field) or {tests_field!r} "
                      f"(config.prompts.tests_field); keys: {sorted(rec)}")
    tests = rec[tests_field]
    if isinstance(tests, str) and tests.strip().startswith("["):
      try:
        tests = json.loads(tests)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: {tests_field!r} is a string that is not a JSON list: "
                        f"{e}") from None
    elif isinstance(tests, str):
      tests = [tests]
    if rec[question_field] and tests:
      tasks.append(dict(question=rec[question_field], tests=list(tests),
                        solution=rec.get("solution")))
  if not tasks:
    raise DataError(f"config.prompts.path={path!r} holds no usable tasks (every record's "
                    f"{question_field!r} or {tests_field!r} is empty)")
  return tasks


def parse_id_range(spec: str) -> tuple[int, int]:
  try:
    low, high = (int(x) for x in spec.split("-"))
  except ValueError:
    raise ValueError(f"config.prompts.mbpp_task_ids={spec!r} must look like '601-974'") from None
  return low, high


def load_mbpp_tasks(path: str, task_ids: str = "601-974") -> list[dict]:
  """MBPP records with low <= task_id <= high -> tasks (setup code prepended to asserts)."""
  low, high = parse_id_range(task_ids)
  tasks = []
  for where, rec in _read_jsonl(path, "config.prompts.path"):
    missing = [k for k in ("task_id", "text", "test_list") if k not in rec]
    if missing:
      raise DataError(f"{where}: MBPP record lacks {missing}; keys: {sorted(rec)}")
    if not low <= int(rec["task_id"]) <= high:
      continue
    setup = (rec.get("test_setup_code") or "").strip()
    tests = [f"{setup}\n{t}" if setup else t for t in rec["test_list"]]
    tasks.append(dict(question=rec["text"], tests=tests, solution=rec.get("code")))
  if not tasks:
    raise ValueError(f"no MBPP task in {path} has a task_id in {task_ids} "
                     "(config.prompts.mbpp_task_ids)")
  return tasks


def make_tasks(prompts_config) -> list[dict]:
  """The tasks `config.prompts` names."""
  p = prompts_config
  if p.source == "jsonl":
    return load_jsonl_tasks(p.path, p.question_field, p.tests_field)
  if p.source == "mbpp":
    return load_mbpp_tasks(p.path, p.mbpp_task_ids)
  if p.source == "synthetic":
    return synthetic.synthetic_tasks(int(p.synthetic_tasks), int(p.synthetic_seed))
  raise ValueError(f"config.prompts.source={p.source!r} is not jsonl, mbpp or synthetic")


# ----------------------------------------------------------------------------- pipeline


class EncodePrompt(grain.transforms.Map):
  """task index -> {"ids": [max_len] left-padded, "length", "index"}."""

  def __init__(self, tasks, tokenizer, max_len: int, system_prompt, add_first_test: bool):
    self._tasks, self._tok, self._max_len = tasks, tokenizer, max_len
    self._system, self._add_first_test = system_prompt, add_first_test

  def map(self, index):
    index = int(index)
    text = prompt_text(self._tok, self._tasks[index], self._system, self._add_first_test)
    ids = encode_prompt(self._tok, text, self._max_len)
    row = np.full((self._max_len,), self._tok.pad_id, np.int32)
    row[self._max_len - len(ids):] = ids
    return {"ids": row, "length": np.int32(len(ids)), "index": np.int32(index)}


def prompt_dataset(tasks, tokenizer, *, batch_size: int, seed: int, max_len: int,
                   system_prompt: str | None, add_first_test: bool = True,
                   shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """Endless host-local batches of encoded prompts; `iter()` it for a checkpointable iterator."""
  ds = grain.MapDataset.range(len(tasks)).shuffle(seed=seed).repeat()
  ds = ds[shard_index::shard_count]
  ds = ds.map(EncodePrompt(tasks, tokenizer, max_len, system_prompt, add_first_test))
  return ds.batch(batch_size, drop_remainder=True)


def collate(batch, pad_multiple: int):
  """(ids_BxP, mask_BxP, index_B): left padding trimmed to a multiple of `pad_multiple`."""
  ids, length = np.asarray(batch["ids"]), np.asarray(batch["length"])
  max_len = ids.shape[1]
  keep = min(max_len, -(-int(length.max()) // pad_multiple) * pad_multiple)
  mask = np.arange(max_len)[None, :] >= (max_len - length)[:, None]
  return ids[:, -keep:], mask[:, -keep:], np.asarray(batch["index"])
