"""The compiled sampler behind the server and `prompts_file`: fixed-shape batches in, texts out.

`Engine.run(rows, options)` samples token-id prompts in chunks of exactly `batch_size` rows
(the last chunk padded with copies of its last row), each left-padded to a multiple of
`prompt_bucket` tokens, so every call with the same `Options.program_key()` and prompt bucket
reuses one compiled program of `dcjax.diffusion.sampler.generate` (its jit cache). The engine
counts the distinct programs it has run (each one XLA compile) and refuses a new one past
`max_programs`. Values that are only array inputs of the program (temperature, top_p,
alg_temp, threshold, the prompt) never recompile. Not thread-safe: one caller (the batcher's
worker thread, or mode=sample) drives it.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dcjax.data.tokenizer import Tokenizer
from dcjax.diffusion import decode
from dcjax.diffusion.sampler import generate
from dcjax.diffusion.sampler_config import sampler_kwargs
from dcjax.parallel.rules import MESH_AXES
from dcjax.parallel.sharding import to_host
from dcjax.serve.settings import Settings


# Options that reach the program only as array values, and what of them is static.
_VALUE_ONLY = {"temperature": lambda v: v > 0, "top_p": lambda v: v is not None,
               "alg_temp": bool, "threshold": lambda v: v is not None}


@dataclasses.dataclass(frozen=True)
class Options:
  """`generate`'s options for one batch (hashable: rows with equal options share a batch).

  `kwargs` holds whatever `sampler_kwargs` returns, as sorted (name, value) pairs, so options
  the sampler gains later pass through (and key the compiled program) unchanged.
  """

  kwargs: tuple[tuple[str, Any], ...]
  seed: int | None = None  # None: a fresh key per batch

  @classmethod
  def from_section(cls, section, seed: int | None = None) -> "Options":
    """From a validated sampler section (`config.sampler`'s form)."""
    return cls(tuple(sorted(sampler_kwargs(section).items())), seed)

  def generate_kwargs(self) -> dict[str, Any]:
    return dict(self.kwargs)

  @property
  def max_new_tokens(self) -> int:
    return self.generate_kwargs()["max_new_tokens"]

  def program_key(self) -> tuple:
    """What the compiled program depends on: every option but the values in `_VALUE_ONLY`,
    of which only whether they are on."""
    return tuple((k, _VALUE_ONLY[k](v) if k in _VALUE_ONLY else v) for k, v in self.kwargs)

  def describe(self) -> str:
    o = self.generate_kwargs()
    return f"{o['max_new_tokens']} tokens / {o['steps']} steps {o['alg']}"


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  finish_reason: str  # "stop": a stop token ended it; "length": the canvas was filled
  prompt_tokens: int
  completion_tokens: int


class ProgramLimitError(RuntimeError):
  """A batch would compile a program past `max_programs`."""


class Engine:
  """Model, parameters and tokenizer on a mesh, sampled in fixed-shape batches."""

  def __init__(self, model_config, params, tokenizer: Tokenizer, mesh, settings: Settings, *,
               seed: int = 0, log: Callable[[str], None] = print):
    self.model_config, self.params, self.tokenizer, self.mesh = (
        model_config, params, tokenizer, mesh)
    self.settings, self.log = settings, log
    shards = int(np.prod([mesh.shape[a] for a in MESH_AXES[:2]]))
    self.batch_size = -(-settings.batch_size // shards) * shards
    self.stop_ids = decode.stop_token_ids(tokenizer)
    self.programs: dict[tuple, int] = {}  # program -> batches run with it
    self.stats = {"batches": 0, "rows": 0, "padding_rows": 0, "compile_seconds": 0.0}
    self._root = jax.random.key(seed)
    self._batches = itertools.count()
    self._lock = threading.Lock()  # guards programs / stats for readers on other threads

  @property
  def compiles(self) -> int:
    return len(self.programs)

  def snapshot(self) -> dict:
    with self._lock:
      return {**self.stats, "compiles": self.compiles, "batch_size": self.batch_size,
              "programs": [{"options": dict(k[0]), "prompt_len": k[1], "batches": v}
                           for k, v in self.programs.items()]}

  # -- inputs
  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text)

  def prompt_len(self, longest: int) -> int:
    """The padded prompt width of a batch whose longest prompt has `longest` tokens."""
    bucket = self.settings.prompt_bucket
    return max(1, -(-longest // bucket) * bucket)

  def check(self, rows: Sequence[Sequence[int]], options: Options) -> tuple[str, str] | None:
    """(field, why) when these rows cannot be sampled with `options`; None when they can."""
    longest = max(len(r) for r in rows)
    if longest == 0:
      return "prompt", "the prompt is empty after tokenization"
    if any(self.tokenizer.mask_id in r for r in rows):
      return "prompt", ("the prompt holds the mask token (<|mask|>): infilling is not "
                        "supported by this server yet")
    if longest > self.settings.max_prompt_tokens:
      return "prompt", (f"the prompt has {longest} tokens, more than this server's maximum of "
                        f"{self.settings.max_prompt_tokens} (serve.max_prompt_tokens)")
    canvas = self.prompt_len(longest) + options.max_new_tokens
    limit = self.model_config.max_position_embeddings
    if canvas > limit:
      return "max_tokens", (f"a {self.prompt_len(longest)}-token padded prompt + max_tokens="
                            f"{options.max_new_tokens} = {canvas} positions, more than the "
                            f"model's max_position_embeddings={limit}")
    return None

  def can_compile(self, options: Options, prompt_len: int) -> bool:
    key = (options.program_key(), prompt_len, self.batch_size)
    with self._lock:
      return (key in self.programs or not self.settings.max_programs
              or len(self.programs) < self.settings.max_programs)

  # -- sampling
  def run(self, rows: Sequence[Sequence[int]], options: Options) -> list[Completion]:
    """Completions of token-id prompts, in order (cut at the stop tokens; special tokens
    dropped from the text, as mode=sample prints them)."""
    out = []
    for start in range(0, len(rows), self.batch_size):
      out.extend(self._batch(rows[start:start + self.batch_size], options))
    return out

  def _batch(self, rows, options: Options) -> list[Completion]:
    b, p = self.batch_size, self.prompt_len(max(len(r) for r in rows))
    key = (options.program_key(), p, b)
    if not self.can_compile(options, p):
      raise ProgramLimitError(
          f"these options need a new compiled sampler program, and the server already holds "
          f"serve.max_programs={self.settings.max_programs}; use options (steps, alg, "
          f"max_tokens, block_length, threshold, cache, top_k) of earlier requests")
    ids = np.full((b, p), self.tokenizer.pad_id, np.int32)
    keep = np.zeros((b, p), bool)
    padded = list(rows) + [rows[-1]] * (b - len(rows))
    for i, r in enumerate(padded):
      ids[i, p - len(r):], keep[i, p - len(r):] = r, True
    index = next(self._batches)
    rng = (jax.random.fold_in(jax.random.key(options.seed), index) if options.seed is not None
           else jax.random.fold_in(self._root, index))
    new = key not in self.programs
    start = time.perf_counter()
    result = generate(self.model_config, self.params, ids, keep, rng=rng, mesh=self.mesh,
                      end_token_ids=self.stop_ids, **options.generate_kwargs())
    tokens = to_host(result.tokens)
    seconds = time.perf_counter() - start
    with self._lock:
      self.programs[key] = self.programs.get(key, 0) + 1
      self.stats["batches"] += 1
      self.stats["rows"] += len(rows)
      self.stats["padding_rows"] += b - len(rows)
      if new:
        self.stats["compile_seconds"] += seconds
    compiled = f" (new program #{self.compiles}, compiled)" if new else ""
    self.log(f"batch {index}: {len(rows)} rows (+{b - len(rows)} padding) x {p}-token prompts, "
             f"{options.describe()}, {seconds:.2f}s{compiled}")
    return [self._completion(row, tokens[i, p:]) for i, row in enumerate(rows)]

  def _completion(self, prompt, completion_ids) -> Completion:
    kept = decode.cut_at_stop(completion_ids, self.stop_ids)
    return Completion(
        text=self.tokenizer.decode(kept, skip_special_tokens=True),
        finish_reason="stop" if len(kept) < len(completion_ids) else "length",
        prompt_tokens=len(prompt), completion_tokens=len(kept))
