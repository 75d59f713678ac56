"""DiffuCoder rewards (docs/rewards.md): format rule, per-assert code reward, registry."""

import random
import re

import numpy as np
import pytest

from dcjax.execution import Sandbox, SandboxConfig
from dcjax.rl import rewards
from dcjax.rl.rewards import (DEFAULT_WEIGHTS, code_reward, code_rewards, compute_rewards,
                              extract_code, format_reward, get_reward, register_reward)

CODE = "def add(a, b):\n    return a + b\n"
ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]


def fenced(code: str, before: str = "Here is the code to solve this problem:\n") -> str:
  return f"{before}```python\n{code}```\n"


# (completion, asserts, expected code reward, expected format reward)
TABLE = {
    "correct": (fenced(CODE), ASSERTS[:2], 1.0, 1.0),
    "syntax_error": (fenced("def add(a, b):\n    return a +\n"), ASSERTS[:2], 0.0, 0.5),
    "missing_closing_fence": (f"```python\n{CODE}", ASSERTS[:2], 0.0, 0.0),
    "two_python_blocks": (fenced(CODE) + fenced("x = 1\n", before="\n"), ASSERTS[:2], 0.0, 0.0),
    "partial_asserts": (fenced(CODE), ASSERTS, 2 / 3, 1.0),
    "no_trailing_newline": (fenced(CODE)[:-1], ASSERTS[:2], 0.0, 0.0),
    "text_after_block": (fenced(CODE) + "Hope this helps!\n", ASSERTS[:2], 0.0, 0.0),
    "fence_in_prose": ("Use ``` fences.\n" + fenced(CODE, before=""), ASSERTS[:2], 0.0, 0.0),
    "no_block": (CODE, ASSERTS[:2], 0.0, 0.0),
    "empty_block": ("```python\n```\n", ASSERTS[:2], 0.0, 1.0),
    "wrong_language": (fenced(CODE).replace("```python", "```py"), ASSERTS[:2], 0.0, 0.0),
    "early_exit_hack": (fenced(CODE + "import os\nos._exit(0)\n"), ASSERTS[:2], 0.0, 1.0),
}


@pytest.fixture(scope="module")
def table_rewards():
  names = list(TABLE)
  codes = code_rewards([TABLE[n][0] for n in names], [TABLE[n][1] for n in names])
  return dict(zip(names, codes))


@pytest.mark.parametrize("name", list(TABLE))
def test_reward_table(table_rewards, name):
  text, asserts, want_code, want_format = TABLE[name]
  assert format_reward(text) == want_format
  assert table_rewards[name] == pytest.approx(want_code)


def test_single_code_reward_matches_batch():
  text, asserts, want, _ = TABLE["partial_asserts"]
  assert code_reward(text, asserts) == pytest.approx(want)


def _rule_by_regex(text: str) -> bool:
  """The format rule written as one regular expression (what the released code matches)."""
  no_fence = r"(?:(?!```)[\s\S])*?"
  return re.fullmatch(no_fence + r"```python\n" + no_fence + r"```\n", text) is not None


def test_extract_code_agrees_with_regex_rule_on_random_texts():
  rng = random.Random(0)
  pieces = ["```", "```python\n", "```\n", "`", "``", "python", "\n", "x = 1", " ", "```py\n"]
  for _ in range(5000):
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 7)))
    assert (extract_code(text) is not None) == _rule_by_regex(text), repr(text)


def test_extract_code_returns_the_unstripped_block():
  assert extract_code(fenced("\n  x = 1\n")) == "\n  x = 1\n"
  assert format_reward(fenced("\n  x = 1\n")) == 1.0  # parsed after strip(), as released


def test_asserts_run_separately_in_one_pool_call(monkeypatch):
  calls = []
  original = Sandbox.run_many

  def counting(self, sources):
    sources = list(sources)
    calls.append((self.config.timeout_s, sources))
    return original(self, sources)

  monkeypatch.setattr(Sandbox, "run_many", counting)
  texts = [fenced(CODE), fenced(CODE.replace("+", "-")), "no code"]
  tests = [ASSERTS, ASSERTS[:1], ASSERTS]
  values = code_rewards(texts, tests)
  assert values == pytest.approx([2 / 3, 0.0, 0.0])
  assert len(calls) == 1
  timeout, programs = calls[0]
  assert timeout == rewards.ASSERT_TIMEOUT_S == 5.0
  assert programs[0] == CODE + "\n" + ASSERTS[0]  # code, newline, one assert
  assert len(programs) == 4  # the unformatted completion runs nothing


def test_slow_code_times_out_to_zero():
  slow = fenced("def add(a, b):\n    while True:\n        pass\n")
  value = code_reward(slow, ASSERTS[:1], sandbox=SandboxConfig(timeout_s=1.0))
  assert value == 0.0


def test_bad_arguments():
  with pytest.raises(ValueError, match="2 completions but 1 test lists"):
    code_rewards(["a", "b"], [ASSERTS])
  with pytest.raises(TypeError, match="tests\\[0\\]"):
    code_rewards([fenced(CODE)], ["assert True"])
  assert code_rewards([fenced(CODE)], [[]]) == [0.0]


def test_default_weights_and_breakdown():
  texts = [TABLE["correct"][0], TABLE["syntax_error"][0], TABLE["partial_asserts"][0]]
  tests = [ASSERTS[:2], ASSERTS[:2], ASSERTS]
  out = compute_rewards(texts, tests)
  assert DEFAULT_WEIGHTS == {"code": 2.0, "format": 0.5}
  np.testing.assert_allclose(out.per_name["code"], [1.0, 0.0, 2 / 3])
  np.testing.assert_allclose(out.per_name["format"], [1.0, 0.5, 1.0])
  np.testing.assert_allclose(out.total, [2.5, 0.25, 2 * 2 / 3 + 0.5])


def test_registry_takes_user_rewards():
  name = "test_length_penalty"

  @register_reward(name)
  def length_penalty(completions, tests, *, sandbox=None):
    return [-len(c) / 100 for c in completions]

  try:
    assert get_reward(name) is length_penalty
    with pytest.raises(ValueError, match="already registered"):
      register_reward(name, length_penalty)
    out = compute_rewards(["x" * 50, "```python\nx=1\n```\n"], [[], []],
                          weights={"format": 1.0, name: 2.0})
    np.testing.assert_allclose(out.total, [-1.0, 1.0 - 2 * 0.18])
  finally:
    rewards._REGISTRY.pop(name, None)
  with pytest.raises(KeyError, match="no reward named"):
    get_reward(name)
