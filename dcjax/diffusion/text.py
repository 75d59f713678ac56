"""Texts in, texts out: the sampler for callers that hold strings (serving, lm-eval, notebooks).

`generate_texts` encodes, left-pads, runs `dcjax.diffusion.sampler.generate` once and decodes.
A text without `<|mask|>` gets `max_new_tokens` new tokens and returns its completion cut at
the first stop token (eos, pad, `<|im_end|>`, `<|dlm_pad|>`). A text with `<|mask|>` spans is
infilled (docs/sampler.md, "Infilling") and returns whole, its masks replaced by the generated
tokens; plain texts batched with it get their `max_new_tokens` masks written as text, so the
whole batch is one infilling call (no blocks or block cache then).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from dcjax.data.tokenizer import MASK, Tokenizer
from dcjax.diffusion import canvas, decode
from dcjax.diffusion.sampler import BATCH_AXES, generate
from dcjax.parallel.sharding import to_host


def generate_texts(model_config: Any, params, tokenizer: Tokenizer, texts: Sequence[str], *,
                   max_new_tokens: int, steps: int, alg: str = "entropy",
                   rng: jax.Array | None = None, mesh=None, prompt_bucket: int = 1,
                   **options) -> list[str]:
  """One string per text: its completion cut at the first stop token, or, for a text holding
  `<|mask|>`, the text with its masks filled.

  `options` are `generate`'s other keyword arguments (temperature, top_p, block_length,
  cfg_scale, early_stop, ...; `sampler_config.sampler_kwargs(config.sampler)` gives them all
  from a config section); `end_token_ids` defaults to the tokenizer's stop tokens. Prompts are
  left-padded to a multiple of `prompt_bucket` tokens (fewer compiled shapes) and the batch
  to a multiple of the mesh's data x fsdp size.
  """
  texts = list(texts)
  if not texts:
    return []
  infill = any(canvas.has_masks(t) for t in texts)
  rows = [t if (not infill or canvas.has_masks(t)) else t + MASK * max_new_tokens
          for t in texts]
  shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  rows += [rows[-1]] * (-len(rows) % shards)
  longest = max(len(canvas.encode_with_masks(tokenizer, t)) for t in set(rows))
  ids, keep = canvas.encode_canvases(tokenizer, rows,
                                     length=-(-longest // prompt_bucket) * prompt_bucket)
  options.setdefault("end_token_ids", decode.stop_token_ids(tokenizer))
  out = generate(model_config, params, ids, keep, max_new_tokens=0 if infill else max_new_tokens,
                 steps=steps, alg=alg, rng=rng, mesh=mesh, **options)
  tokens = to_host(out.tokens)
  stops = decode.stop_token_ids(tokenizer)
  results = []
  for row, text in enumerate(texts):
    if not infill:
      results.append(decode.decode_completions(tokenizer, tokens[row:row + 1], ids.shape[1],
                                               stop_ids=stops)[0])
    elif canvas.has_masks(text):
      results.append(canvas.filled_texts(tokenizer, tokens[row:row + 1], keep[row:row + 1])[0])
    else:  # its completion: the tokens after the text's own, cut at the first stop
      start = ids.shape[1] - max_new_tokens
      cut = decode.cut_at_stop(tokens[row, start:], stops)
      results.append(tokenizer.decode(cut, skip_special_tokens=True))
  return results
