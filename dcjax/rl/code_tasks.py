"""A generated code-task family that a CPU-scale model can partly learn (docs/grpo.md,
"Code-execution study").

A task is one small Python function, named after its template and constant, with asserts:

    Write a Python function push_4(xs) that returns xs with 4 appended.
    assert push_4([50, 21, 43]) == [50, 21, 43, 4]        (ASSERTS_PER_TASK asserts)
    def push_4(xs):\n    return xs + [4]\n                (the reference solution)

Twelve templates: arithmetic (add, sub, mul, div, mod), conditionals (cap: min, big: a
comparison), string (size, tag) and list transforms (push, count, shift); each is combined
with a constant k from CONSTANTS. The splits are compositional:

  held-out   for every template, HELDOUT_PER_TEMPLATE constants drawn from `seed`: every
             template and every constant appears in training, but never this pair;
  train      every other (template, k) pair; RL samples its prompts from all of them;
  sft        a subset of the training pairs (`sft_fraction` of them): the warm start sees
             only their reference solutions.

Every (template, k) pair yields one task; its asserts' arguments are drawn from `seed`, and
a task's asserts expect different values, so no constant answer passes them all.

Each template also has a slip: the plausible mistake of a careless teacher, one operator or
operand order away from the reference (`x - k` for `x + k`, `max` for `min`, `[k] + xs` for
`xs + [k]`). Every assert of a task tells the two apart. `teacher_demos` writes the warm
start's demonstrations with a share of slips, so the warm-started policy puts most of its
mass on the slip and some on the right answer: room that only the execution reward can
show RL (docs/grpo.md, "Code-execution study").
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

# (name, argument, phrase, expression, python function of (argument, k), argument kind,
#  slip: a plausible mistake, the expression a careless teacher writes instead)
TEMPLATES = (
    ("add", "x", "returns x plus {k}", "x + {k}", lambda x, k: x + k, "int", "x - {k}"),
    ("sub", "x", "returns x minus {k}", "x - {k}", lambda x, k: x - k, "int", "{k} - x"),
    ("mul", "x", "returns x times {k}", "x * {k}", lambda x, k: x * k, "int", "x + {k}"),
    ("div", "x", "returns x divided by {k}, rounded down", "x // {k}", lambda x, k: x // k,
     "int", "x % {k}"),
    ("mod", "x", "returns x modulo {k}", "x % {k}", lambda x, k: x % k, "int", "{k} % x"),
    ("cap", "x", "returns the smaller of x and {k}", "min(x, {k})", lambda x, k: min(x, k),
     "int", "max(x, {k})"),
    ("big", "x", "returns 1 if x is greater than {k}, else 0", "1 if x > {k} else 0",
     lambda x, k: 1 if x > k else 0, "int", "1 if x < {k} else 0"),
    ("size", "s", "returns the length of s plus {k}", "len(s) + {k}",
     lambda s, k: len(s) + k, "str", "len(s) - {k}"),
    ("tag", "s", "returns s followed by the digits of {k}", "s + '{k}'",
     lambda s, k: s + str(k), "str", "'{k}' + s"),
    ("push", "xs", "returns xs with {k} appended", "xs + [{k}]", lambda v, k: v + [k],
     "list", "[{k}] + xs"),
    ("count", "xs", "returns how many elements of xs are greater than {k}",
     "sum(v > {k} for v in xs)", lambda v, k: sum(a > k for a in v), "list",
     "sum(v < {k} for v in xs)"),
    ("shift", "xs", "returns xs with {k} added to every element", "[v + {k} for v in xs]",
     lambda v, k: [a + k for a in v], "list", "[v - {k} for v in xs]"),
)
# Constants come from a wide range, so a model cannot memorise one answer per function name
# and has to read the constant off the prompt (mul's stays small to keep products short).
WIDE = tuple(range(2, 50))
CONSTANTS = {t[0]: WIDE for t in TEMPLATES} | {"mul": tuple(range(2, 20))}
HELDOUT_PER_TEMPLATE = 3
ASSERTS_PER_TASK = 2
LETTERS = "abcdefgh"


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  arg: str
  phrase: str
  expr: str
  fn: Callable
  kind: str
  slip: str


def templates() -> list[Template]:
  return [Template(*t) for t in TEMPLATES]


def _argument(rng: random.Random, t: Template):
  """A random argument of the template's kind."""
  if t.kind == "int":
    return rng.randrange(0, 60)
  if t.kind == "str":
    return "".join(rng.choice(LETTERS) for _ in range(rng.randrange(2, 6)))
  return [rng.randrange(0, 60) for _ in range(3)]


def _slip_value(t: Template, a, k: int):
  """What the slip expression returns on argument `a` (None when it raises)."""
  try:
    return eval(t.slip.format(k=k), {}, {t.arg: a})  # pylint: disable=eval-used
  except ArithmeticError:
    return None


def make_task(t: Template, k: int, rng: random.Random) -> dict:
  """One task {"question", "tests", "solution", "slip_solution", "template", "k"}. Its asserts
  expect different values (so a constant answer cannot pass them all), and the slip fails
  every one of them (so each assert, the prompt's included, tells the two apart)."""
  name = f"{t.name}_{k}"
  args, outputs = [], set()
  while len(args) < ASSERTS_PER_TASK:
    a = _argument(rng, t)
    want = t.fn(a, k)
    slip = _slip_value(t, a, k)
    if repr(want) not in outputs and (slip is None or slip != want):
      outputs.add(repr(want))
      args.append(a)
  return dict(
      question=f"Write a Python function {name}({t.arg}) that {t.phrase.format(k=k)}.",
      tests=[f"assert {name}({a!r}) == {t.fn(a, k)!r}" for a in args],
      solution=f"def {name}({t.arg}):\n    return {t.expr.format(k=k)}\n",
      slip_solution=f"def {name}({t.arg}):\n    return {t.slip.format(k=k)}\n",
      template=t.name, k=k)


def teacher_demos(tasks: list[dict], slip_rate: float, copies: int, seed: int = 0) -> list[dict]:
  """`copies` demonstrations of every task from a careless teacher: each one is the task with
  its `solution` replaced by the slip with probability `slip_rate` (drawn from `seed`)."""
  rng = random.Random(f"teacher-{seed}")
  return [dict(t, solution=t["slip_solution"]) if rng.random() < slip_rate else t
          for t in tasks for _ in range(copies)]


def heldout_pairs(seed: int = 0) -> set[tuple[str, int]]:
  """(template, k) pairs never seen in training: HELDOUT_PER_TEMPLATE constants per template."""
  rng = random.Random(f"heldout-{seed}")
  return {(t.name, k) for t in templates()
          for k in rng.sample(CONSTANTS[t.name], HELDOUT_PER_TEMPLATE)}


@dataclasses.dataclass(frozen=True)
class Splits:
  train: list[dict]     # every training pair (RL prompts)
  sft: list[dict]       # the warm start's subset of `train`
  heldout: list[dict]   # unseen (template, k) pairs, unseen assert arguments


def code_splits(seed: int = 0, sft_fraction: float = 0.5) -> Splits:
  """The three splits (deterministic in `seed`); see the module docstring."""
  rng = random.Random(seed)
  held = heldout_pairs(seed)
  train, heldout = [], []
  for t in templates():
    for k in CONSTANTS[t.name]:
      if (t.name, k) in held:
        heldout.append(make_task(t, k, rng))
      else:
        train.append(make_task(t, k, rng))
  order = list(range(len(train)))
  rng.shuffle(order)
  sft = [train[i] for i in sorted(order[:round(sft_fraction * len(train))])]
  return Splits(train=train, sft=sft, heldout=heldout)
