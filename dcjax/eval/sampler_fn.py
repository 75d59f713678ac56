"""The evaluation's `generate_fn` built from the jitted sampler (dcjax.diffusion.sampler)."""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import numpy as np

from dcjax.diffusion import decode
from dcjax.diffusion.loading import load_model_and_tokenizer
from dcjax.diffusion.sampler_config import sampler_kwargs
from dcjax.diffusion.sampler import generate
from dcjax.parallel.sharding import to_host
from dcjax.parallel.rules import MESH_AXES
from dcjax.train import handoff

PROMPT_BUCKET = 64  # prompt lengths are padded to a multiple of this: few compiled shapes


def make_generate_fn(config, mesh):
  """generate_fn(prompts, n) -> n completions per prompt, cut at the stop tokens.

  The model and tokenizer come from `config.hf_dir`, or a previous run's orbax workdir
  `config.checkpoint_dir` (with the tokenizer it used), or a random `config.model` with the
  byte tokenizer when both are empty; sampling settings from `config.sampler`. Each call
  draws from a fresh key folded from `config.seed`.
  """
  model_config, params, tokenizer = load_model_and_tokenizer(
      config, mesh, handoff.from_config(config, "checkpoint_dir"))
  kwargs = sampler_kwargs(config.sampler)
  # The tokenizer's end tokens (eos, pad, <|im_end|>, <|dlm_pad|>), as mode=sample passes
  # them: early_stop / confidence_eos_eot_inf then see the chat end token too.
  kwargs["end_token_ids"] = decode.stop_token_ids(tokenizer)
  shards = int(np.prod([mesh.shape[a] for a in MESH_AXES[:2]]))
  calls = itertools.count()
  root = jax.random.key(config.seed)

  def generate_fn(prompts: Sequence[str], n: int) -> list[list[str]]:
    texts = [p for p in prompts for _ in range(n)]
    batch = -(-len(texts) // shards) * shards  # a whole number of rows per data shard
    texts += [texts[-1]] * (batch - len(texts))
    longest = max(len(tokenizer.encode(t)) for t in set(texts))
    ids, keep = decode.encode_left_padded(
        tokenizer, texts, length=-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET)
    out = generate(model_config, params, ids, keep, rng=jax.random.fold_in(root, next(calls)),
                   mesh=mesh, **kwargs)
    tokens = to_host(out.tokens)  # every process decodes all rows
    completions = decode.decode_completions(tokenizer, tokens, ids.shape[1])
    return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

  return generate_fn
