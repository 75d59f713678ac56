"""The compiled sampler behind the server and `prompts_file`: fixed-shape batches in, texts out.

`Engine.run(rows, options)` samples token-id prompts in chunks of exactly `batch_size` rows
(the last chunk padded with copies of its last row), each left-padded to a multiple of
`prompt_bucket` tokens, so every call with the same `Options.program_key()` and prompt bucket
reuses one compiled program of `dcjax.diffusion.sampler.generate` (its jit cache). The engine
counts the distinct programs it has run (each one XLA compile) and refuses a new one past
`max_programs`. Values that are only array inputs of the program (temperature, top_p,
alg_temp, threshold, cfg_scale, the prompt) never recompile. Not thread-safe: one caller (the
batcher's worker thread, or mode=sample) drives it.

Infilling (`Options.infill`, docs/serving.md): the rows are canvases holding mask ids, filled
in place (`max_new_tokens` 0, a program of its own). Dream's schedule counts the batch's
average masks per row, so infill rows share a batch only with rows of the same canvas bucket
and the same number of masks (`batch_key`): a row's fill never depends on its neighbours.
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
from dcjax.diffusion import canvas, decode
from dcjax.diffusion.sampler import generate
from dcjax.diffusion.sampler_config import sampler_kwargs
from dcjax.parallel.rules import MESH_AXES
from dcjax.parallel.sharding import to_host
from dcjax.serve.settings import Settings


# Options that reach the program only as array values, and what of them is static.
_VALUE_ONLY = {"temperature": lambda v: v > 0, "top_p": lambda v: v is not None,
               "alg_temp": bool, "threshold": lambda v: v is not None,
               "cfg_scale": lambda v: v > 0}


@dataclasses.dataclass(frozen=True)
class Options:
  """`generate`'s options for one batch (hashable: rows with equal options share a batch).

  `kwargs` holds whatever `sampler_kwargs` returns, as sorted (name, value) pairs, so options
  the sampler gains later pass through (and key the compiled program) unchanged.
  """

  kwargs: tuple[tuple[str, Any], ...]
  seed: int | None = None  # None: a fresh key per batch
  infill: bool = False  # the rows hold masks to fill in place; nothing is appended

  @classmethod
  def from_section(cls, section, seed: int | None = None, *, infill: bool = False
                   ) -> "Options":
    """From a validated sampler section (`config.sampler`'s form); with `infill`, the
    canvas is the prompt itself (`max_new_tokens` 0; blocks and cache must be off)."""
    kwargs = sampler_kwargs(section)
    if infill:
      if kwargs["block_length"] is not None or kwargs["cache"] is not None:
        raise ValueError(f"infilling runs without blocks or a block cache; got block_length="
                         f"{kwargs['block_length']}, cache={kwargs['cache']!r}")
      kwargs["max_new_tokens"] = 0
    return cls(tuple(sorted(kwargs.items())), seed, infill)

  def generate_kwargs(self) -> dict[str, Any]:
    return dict(self.kwargs)

  @property
  def max_new_tokens(self) -> int:
    return self.generate_kwargs()["max_new_tokens"]

  def program_key(self) -> tuple:
    """What the compiled program depends on: every option but the values in `_VALUE_ONLY`,
    of which only whether they are on."""
    return tuple((k, _VALUE_ONLY[k](v) if k in _VALUE_ONLY else v)
                 for k, v in self.kwargs) + (("infill", self.infill),)

  def describe(self) -> str:
    o = self.generate_kwargs()
    size = "infill" if self.infill else f"{o['max_new_tokens']} tokens"
    return f"{size} / {o['steps']} steps {o['alg']}"


@dataclasses.dataclass(frozen=True)
class Completion:
  """One row's result. A completion: `text` cut at the first stop token. An infilled canvas:
  `text` is the whole filled text and `fills` the text of each run of masks, in order; the
  stop tokens the sampler wrote into a run (its padding of a span longer than needed) are
  dropped, and make `finish_reason` "stop"."""

  text: str
  finish_reason: str  # "stop": a stop token ended it; "length": the canvas was filled
  prompt_tokens: int  # the given tokens (an infill canvas: those that are not masks)
  completion_tokens: int  # generated tokens before the stop / not stop tokens
  fills: tuple[str, ...] = ()


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
    """Token ids; each `<|mask|>` is one mask id, the text between encoded on its own."""
    return canvas.encode_with_masks(self.tokenizer, text)

  def masks(self, row: Sequence[int]) -> int:
    return sum(1 for t in row if t == self.tokenizer.mask_id)

  def batch_key(self, row: Sequence[int], options: Options) -> tuple:
    """Rows may share a batch when their keys are equal (see the module docstring)."""
    if not options.infill:
      return (options,)
    return (options, self.prompt_len(len(row)), self.masks(row))

  def prompt_len(self, longest: int) -> int:
    """The padded prompt width of a batch whose longest prompt has `longest` tokens."""
    bucket = self.settings.prompt_bucket
    return max(1, -(-longest // bucket) * bucket)

  def check(self, rows: Sequence[Sequence[int]], options: Options) -> tuple[str, str] | None:
    """(field, why) when these rows cannot be sampled with `options`; None when they can."""
    longest = max(len(r) for r in rows)
    if longest == 0:
      return "prompt", "the prompt is empty after tokenization"
    masks = [self.masks(r) for r in rows]
    if options.infill and not all(masks):
      return "prompt", "an infill request's every prompt must hold <|mask|> tokens to fill"
    if not options.infill and any(masks):
      return "prompt", ("the prompt holds the mask token (<|mask|>) but the request is not "
                        "an infill request")
    given = max(len(r) - m for r, m in zip(rows, masks))
    if given > self.settings.max_prompt_tokens:
      return "prompt", (f"the prompt has {given} tokens, more than this server's maximum of "
                        f"{self.settings.max_prompt_tokens} (serve.max_prompt_tokens)")
    if max(masks) > self.settings.max_tokens:
      return "prompt", (f"the prompt holds {max(masks)} <|mask|> tokens, more than this "
                        f"server's maximum of {self.settings.max_tokens} (serve.max_tokens)")
    if options.generate_kwargs().get("logits_eos_inf") and self.model_config.eos_token_id is None:
      return "logits_eos_inf", "logits_eos_inf needs the model's eos_token_id, which is unset"
    positions = self.prompt_len(longest) + options.max_new_tokens
    limit = self.model_config.max_position_embeddings
    if positions > limit and options.infill:
      return "prompt", (f"the canvas (prompt, masks and suffix) pads to {positions} positions, "
                        f"more than the model's max_position_embeddings={limit}")
    if positions > limit:
      return "max_tokens", (f"a {self.prompt_len(longest)}-token padded prompt + max_tokens="
                            f"{options.max_new_tokens} = {positions} positions, more than the "
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
    dropped from the text, as mode=sample prints them); infilled canvases with
    `options.infill`. Rows with different `batch_key`s go to different batches."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
      groups.setdefault(self.batch_key(row, options), []).append(i)
    out: list[Completion | None] = [None] * len(rows)
    for members in groups.values():
      for start in range(0, len(members), self.batch_size):
        chunk = members[start:start + self.batch_size]
        for i, c in zip(chunk, self._batch([rows[i] for i in chunk], options)):
          out[i] = c
    return out

  def _batch(self, rows, options: Options) -> list[Completion]:
    b, p = self.batch_size, self.prompt_len(max(len(r) for r in rows))
    key = (options.program_key(), p, b)
    if not self.can_compile(options, p):
      raise ProgramLimitError(
          f"these options need a new compiled sampler program, and the server already holds "
          f"serve.max_programs={self.settings.max_programs}; use options (steps, alg, "
          f"max_tokens, block_length, threshold, cache, top_k, cfg_scale, logits_eos_inf, "
          f"confidence_eos_eot_inf, early_stop) of earlier requests")
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
    if options.infill:
      return [self._filled(row, tokens[i, p - len(row):]) for i, row in enumerate(rows)]
    return [self._completion(row, tokens[i, p:]) for i, row in enumerate(rows)]

  def _filled(self, row, tokens) -> Completion:
    """An infilled canvas: the given tokens as they were, each run of masks decoded from
    what the sampler wrote there, its stop tokens dropped."""
    mask, stops = self.tokenizer.mask_id, set(self.stop_ids)
    pieces, fills, generated, stopped = [], [], 0, False
    start = 0
    while start < len(row):
      is_mask = row[start] == mask
      end = start
      while end < len(row) and (row[end] == mask) == is_mask:
        end += 1
      ids = [int(t) for t in tokens[start:end]]
      if is_mask:
        kept = [t for t in ids if t not in stops]
        generated, stopped = generated + len(kept), stopped or len(kept) < len(ids)
        fills.append(self.tokenizer.decode(kept, skip_special_tokens=True))
        pieces.append(fills[-1])
      else:
        pieces.append(self.tokenizer.decode(ids))
      start = end
    return Completion(text="".join(pieces), finish_reason="stop" if stopped else "length",
                      prompt_tokens=len(row) - self.masks(row), completion_tokens=generated,
                      fills=tuple(fills))

  def _completion(self, prompt, completion_ids) -> Completion:
    kept = decode.cut_at_stop(completion_ids, self.stop_ids)
    return Completion(
        text=self.tokenizer.decode(kept, skip_special_tokens=True),
        finish_reason="stop" if len(kept) < len(completion_ids) else "length",
        prompt_tokens=len(prompt), completion_tokens=len(kept))
