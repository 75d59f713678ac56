"""Prompts (docs/evaluation.md, base and instruct forms) and turning a completion into a program.

Instruct form: ChatML with the default system prompt; user turn
"Please complete the following problem:\\n```\\n{prompt}\\n```" (HumanEval) or
"```\\n{prompt}\\n```" (MBPP), the prompt stripped of surrounding blank lines; the assistant
turn is prefilled with "Here is the code to solve this problem:\\n```python\\n", so the
completion is code up to the closing fence.

Base form: the raw prompt; the completion continues it and is cut at the usual stop words
(Codex's for HumanEval).
"""

from __future__ import annotations

import re

from dcjax.eval.tasks import Task

SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCT_PREFILL = "Here is the code to solve this problem:\n```python\n"
USER_TEMPLATES = {
    "humaneval": "Please complete the following problem:\n```\n{prompt}\n```",
    "mbpp": "```\n{prompt}\n```",
}
PROMPT_STYLES = ("instruct", "base")
# Text after any of these is never part of the answer (Qwen2 / Dream special tokens).
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|dlm_pad|>", "<|im_start|>")
BASE_STOPS = {
    "humaneval": ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"),
    "mbpp": ("\nassert", '\n"""', "\nif __name__", "\nprint(", "\n```"),
}


def chatml(user: str, system: str = SYSTEM_PROMPT, prefill: str = "") -> str:
  """A ChatML conversation ending in an open assistant turn (optionally prefilled)."""
  return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
          f"<|im_start|>assistant\n{prefill}")


def build_prompt(task: Task, style: str) -> str:
  if style == "base":
    return task.prompt
  if style == "instruct":
    user = USER_TEMPLATES[task.family].format(prompt=task.prompt.strip())
    return chatml(user, prefill=INSTRUCT_PREFILL)
  raise ValueError(f"prompt_style={style!r} is not one of {PROMPT_STYLES}")


def cut_at(text: str, stops) -> str:
  """`text` up to the earliest of `stops` (all of it if none occurs)."""
  cut = len(text)
  for stop in stops:
    i = text.find(stop)
    if i != -1:
      cut = min(cut, i)
  return text[:cut]


def completion_code(task: Task, completion: str, style: str) -> str:
  """The code part of a completion: up to a special token, then up to the closing fence
  (instruct) or the first stop word (base)."""
  text = cut_at(completion, STOP_TOKENS)
  if style == "instruct":
    return cut_at(text, ("```",))
  return cut_at(text, BASE_STOPS[task.family])


def _prompt_imports(prompt: str) -> str:
  lines = [l for l in prompt.splitlines() if re.match(r"(import|from)\s+\w", l)]
  return "\n".join(lines) + "\n\n" if lines else ""


def solution_program(task: Task, completion: str, style: str) -> str:
  """A complete solution program from a completion (tests not included).

  Base: prompt + completion. Instruct: when the code defines the entry point it is taken
  as the whole solution (with the prompt's import lines put first, as models often drop
  them); otherwise it is read as the body that continues the prompt.
  """
  code = completion_code(task, completion, style)
  if style == "base":
    return task.prompt + code
  if re.search(rf"^\s*def\s+{re.escape(task.entry_point)}\s*\(", code, flags=re.M):
    return _prompt_imports(task.prompt) + code
  return task.prompt + code
