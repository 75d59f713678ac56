"""DiffuCoder's coupled-GRPO rewards (docs/rewards.md) and a registry of named, weighted rewards.

Format reward, the rule of the released code (a full match of one regular expression):
the decoded completion (special tokens already stripped by the decoder) is any text without a fence, then "```python\\n", then code without
a fence, then "```\\n" as the very last characters. Any other "```" anywhere (a second
block, a fence in the prose) gives 0. The block's code, stripped, is parsed with
`ast.parse`: 1.0 if it parses, 0.5 on a syntax error.

Code reward: 0 unless the format reward is exactly 1; otherwise the fraction of the item's
asserts that pass, each run as `code + "\\n" + assert` in its own sandboxed interpreter
with a 5 s limit (all asserts of a batch in one parallel pool call).

Rewards are batched functions `fn(completions, tests, *, sandbox) -> list[float]` held in
a registry by name; `compute_rewards` sums them with weights (default 2.0 code + 0.5
format). Register your own with `@register_reward("name")`.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import warnings
from typing import Mapping, Protocol, Sequence

import numpy as np

from dcjax.execution import Sandbox, SandboxConfig

FENCE = "```"
OPEN_FENCE = "```python\n"
CLOSE_FENCE = "```\n"
DEFAULT_WEIGHTS: dict[str, float] = {"code": 2.0, "format": 0.5}
ASSERT_TIMEOUT_S = 5.0

_FENCE_STARTS = re.compile(r"(?=```)")  # every start of "```", overlapping ones too


def extract_code(text: str) -> str | None:
  """The code of the completion's single ```python block, or None if the format is off.

  Returns the text between "```python\\n" and the final "```\\n" (unstripped), only when
  the completion has exactly that block and nothing else fenced (the format rule above).
  """
  starts = [m.start() for m in _FENCE_STARTS.finditer(text)]
  if len(starts) != 2:
    return None
  first, last = starts
  if not text.startswith(OPEN_FENCE, first) or last != len(text) - len(CLOSE_FENCE):
    return None
  if not text.endswith(CLOSE_FENCE) or first + len(OPEN_FENCE) > last:
    return None
  return text[first + len(OPEN_FENCE):last]


def parses(code: str) -> bool:
  """Whether `code` is valid Python (ast.parse). Never raises."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. invalid escape sequences
      ast.parse(code)
    return True
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return False


def format_reward(text: str) -> float:
  """1.0 for one well-placed ```python block that parses, 0.5 if it does not parse, else 0."""
  code = extract_code(text)
  if code is None:
    return 0.0
  return 1.0 if parses(code.strip()) else 0.5


def assert_programs(code: str, asserts: Sequence[str]) -> list[str]:
  """One program per assert: the code, a newline, the assert (as the released code)."""
  return [f"{code}\n{test}" for test in asserts]


def _reward_sandbox(sandbox: SandboxConfig | None) -> SandboxConfig:
  return sandbox if sandbox is not None else SandboxConfig(timeout_s=ASSERT_TIMEOUT_S)


def code_rewards(completions: Sequence[str], tests: Sequence[Sequence[str]], *,
                 sandbox: SandboxConfig | None = None) -> list[float]:
  """Code reward of each completion against its own asserts, in one parallel pool call.

  A completion whose format reward is not 1, or whose item has no asserts, gets 0.
  """
  if len(completions) != len(tests):
    raise ValueError(f"code_rewards: {len(completions)} completions but {len(tests)} test "
                     f"lists")
  programs: list[str] = []
  owners: list[int] = []
  for i, (text, asserts) in enumerate(zip(completions, tests)):
    if isinstance(asserts, str):
      raise TypeError(f"code_rewards: tests[{i}] must be a list of assert strings, got a str")
    if not asserts or format_reward(text) != 1.0:
      continue
    programs += assert_programs(extract_code(text), asserts)
    owners += [i] * len(asserts)
  passed = np.zeros(len(completions))
  if programs:
    results = Sandbox(_reward_sandbox(sandbox)).run_many(programs)
    np.add.at(passed, owners, [float(r.passed) for r in results])
  counts = np.array([max(len(t), 1) for t in tests], dtype=np.float64)
  return (passed / counts).tolist()


def code_reward(text: str, asserts: Sequence[str], *,
                sandbox: SandboxConfig | None = None) -> float:
  """Fraction of `asserts` the completion's code passes (0 unless format_reward == 1)."""
  return code_rewards([text], [list(asserts)], sandbox=sandbox)[0]


def format_rewards(completions: Sequence[str], tests: Sequence[Sequence[str]] | None = None,
                   **_) -> list[float]:
  """Batched format_reward (tests are ignored)."""
  return [format_reward(text) for text in completions]


class RewardFn(Protocol):
  """A batched reward: one float per completion. Must accept `sandbox=` (may ignore it)."""

  def __call__(self, completions: Sequence[str], tests: Sequence[Sequence[str]], *,
               sandbox: SandboxConfig | None = None) -> Sequence[float]: ...


_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False):
  """Registers a batched reward under `name`; usable as `@register_reward("name")`."""
  def add(f: RewardFn) -> RewardFn:
    if name in _REGISTRY and not overwrite:
      raise ValueError(f"a reward named {name!r} is already registered "
                       f"(pass overwrite=True to replace it)")
    _REGISTRY[name] = f
    return f
  return add(fn) if fn is not None else add


def get_reward(name: str) -> RewardFn:
  if name not in _REGISTRY:
    raise KeyError(f"no reward named {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def registered_rewards() -> list[str]:
  return sorted(_REGISTRY)


register_reward("code", code_rewards)
register_reward("format", format_rewards)


@dataclasses.dataclass(frozen=True)
class RewardBreakdown:
  """`total[i] = sum_name weights[name] * per_name[name][i]`."""

  total: np.ndarray
  per_name: dict[str, np.ndarray]
  weights: dict[str, float]


def compute_rewards(completions: Sequence[str], tests: Sequence[Sequence[str]],
                    weights: Mapping[str, float] | None = None, *,
                    sandbox: SandboxConfig | None = None) -> RewardBreakdown:
  """Weighted sum of registered rewards for a batch (default 2.0 code + 0.5 format)."""
  weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
  per_name: dict[str, np.ndarray] = {}
  total = np.zeros(len(completions), dtype=np.float64)
  for name, weight in weights.items():
    values = np.asarray(get_reward(name)(completions, tests, sandbox=sandbox),
                        dtype=np.float64)
    if values.shape != (len(completions),):
      raise ValueError(f"reward {name!r} returned shape {values.shape}, expected "
                       f"({len(completions)},)")
    per_name[name] = values
    total += float(weight) * values
  return RewardBreakdown(total=total, per_name=per_name, weights=weights)

