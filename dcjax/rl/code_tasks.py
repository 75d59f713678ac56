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
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

# (name, argument, phrase, expression, python function of (argument, k), argument kind)
TEMPLATES = (
    ("add", "x", "returns x plus {k}", "x + {k}", lambda x, k: x + k, "int"),
    ("sub", "x", "returns x minus {k}", "x - {k}", lambda x, k: x - k, "int"),
    ("mul", "x", "returns x times {k}", "x * {k}", lambda x, k: x * k, "int"),
    ("div", "x", "returns x divided by {k}, rounded down", "x // {k}", lambda x, k: x // k,
     "int"),
    ("mod", "x", "returns x modulo {k}", "x % {k}", lambda x, k: x % k, "int"),
    ("cap", "x", "returns the smaller of x and {k}", "min(x, {k})", lambda x, k: min(x, k),
     "int"),
    ("big", "x", "returns 1 if x is greater than {k}, else 0", "1 if x > {k} else 0",
     lambda x, k: 1 if x > k else 0, "int"),
    ("size", "s", "returns the length of s plus {k}", "len(s) + {k}",
     lambda s, k: len(s) + k, "str"),
    ("tag", "s", "returns s followed by the digits of {k}", "s + '{k}'",
     lambda s, k: s + str(k), "str"),
    ("push", "xs", "returns xs with {k} appended", "xs + [{k}]", lambda v, k: v + [k],
     "list"),
    ("count", "xs", "returns how many elements of xs are greater than {k}",
     "sum(v > {k} for v in xs)", lambda v, k: sum(a > k for a in v), "list"),
    ("shift", "xs", "returns xs with {k} added to every element", "[v + {k} for v in xs]",
     lambda v, k: [a + k for a in v], "list"),
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


def templates() -> list[Template]:
  return [Template(*t) for t in TEMPLATES]


def _argument(rng: random.Random, t: Template):
  """A random argument of the template's kind."""
  if t.kind == "int":
    return rng.randrange(0, 60)
  if t.kind == "str":
    return "".join(rng.choice(LETTERS) for _ in range(rng.randrange(2, 6)))
  return [rng.randrange(0, 60) for _ in range(3)]


def make_task(t: Template, k: int, rng: random.Random) -> dict:
  """One task {"question", "tests", "solution", "template", "k"}; its asserts expect
  different values (so a constant answer cannot pass them all)."""
  name = f"{t.name}_{k}"
  args, outputs = [], set()
  while len(args) < ASSERTS_PER_TASK:
    a = _argument(rng, t)
    if repr(t.fn(a, k)) not in outputs:
      outputs.add(repr(t.fn(a, k)))
      args.append(a)
  return dict(
      question=f"Write a Python function {name}({t.arg}) that {t.phrase.format(k=k)}.",
      tests=[f"assert {name}({a!r}) == {t.fn(a, k)!r}" for a in args],
      solution=f"def {name}({t.arg}):\n    return {t.expr.format(k=k)}\n",
      template=t.name, k=k)


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
