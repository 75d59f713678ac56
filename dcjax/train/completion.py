"""A sample completion at the end of training, from the sampler on the training mesh."""

from __future__ import annotations

import jax
import numpy as np

from dcjax.diffusion.sampler import BATCH_AXES, generate
from dcjax.parallel.sharding import to_host


def complete(config, model_config, params, tokenizer, prompt: str, *, max_new_tokens: int,
             steps: int, mesh=None) -> tuple[str, str]:
  """(completion text, which sampler produced it) for one prompt, greedy.

  With a mesh the prompt is repeated to fill the mesh's batch shards (`generate` splits the
  batch over data x fsdp; greedy rows are identical) and row 0 is decoded. Every process
  gets the text.
  """
  ids = tokenizer.encode(prompt)
  rows = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  prompt_BxP = np.tile(np.asarray([ids], np.int32), (rows, 1))
  out = generate(model_config, params, prompt_BxP, np.ones_like(prompt_BxP, bool),
                 max_new_tokens=max_new_tokens, steps=steps, alg="entropy", temperature=0.0,
                 rng=jax.random.key(config.seed), mesh=mesh)
  new_ids = to_host(out.tokens)[0, len(ids):].tolist()
  return (tokenizer.decode(new_ids, skip_special_tokens=True),
          "dcjax.diffusion.sampler.generate (entropy, greedy)")
