"""Generated one-line function tasks for the CPU demo: question, asserts and a reference solution.

    Write a Python function add_3(x) that returns x plus 3.
    assert add_3(4) == 7            (two asserts per task, random arguments)
    def add_3(x):\\n    return x + 3\\n

Families: add, sub, mul, mod, max, min with a constant k; `synthetic_tasks(n, seed)` cycles
through (family, k) and draws the assert arguments from `seed`.
"""

from __future__ import annotations

import random

# name template, phrase, expression, python function of (x, k)
FAMILIES = (
    ("add_{k}", "returns x plus {k}", "x + {k}", lambda x, k: x + k),
    ("sub_{k}", "returns x minus {k}", "x - {k}", lambda x, k: x - k),
    ("mul_{k}", "returns x times {k}", "x * {k}", lambda x, k: x * k),
    ("mod_{k}", "returns x modulo {k}", "x % {k}", lambda x, k: x % k),
    ("max_{k}", "returns the larger of x and {k}", "max(x, {k})", lambda x, k: max(x, k)),
    ("min_{k}", "returns the smaller of x and {k}", "min(x, {k})", lambda x, k: min(x, k)),
)
CONSTANTS = tuple(range(2, 10))
ASSERTS_PER_TASK = 2


def synthetic_tasks(n: int, seed: int = 0) -> list[dict]:
  """`n` tasks {"question", "tests", "solution"} (deterministic in `seed`)."""
  rng = random.Random(seed)
  combos = [(f, k) for f in FAMILIES for k in CONSTANTS]
  rng.shuffle(combos)
  tasks = []
  for i in range(n):
    (name_t, phrase_t, expr_t, fn), k = combos[i % len(combos)]
    name = name_t.format(k=k)
    args = rng.sample(range(0, 20), ASSERTS_PER_TASK)
    tasks.append(dict(
        question=f"Write a Python function {name}(x) that {phrase_t.format(k=k)}.",
        tests=[f"assert {name}({x}) == {fn(x, k)}" for x in args],
        solution=f"def {name}(x):\n    return {expr_t.format(k=k)}\n"))
  return tasks
