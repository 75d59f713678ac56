"""A sample completion at the end of training.

Uses the sampler (`dcjax.diffusion.sampler.generate`) when it is importable; otherwise a
small greedy confidence-ordered unmasking loop (`greedy_unmask`) stands in for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dcjax import model as model_lib


def reveal_counts(num_new: int, steps: int) -> np.ndarray:
  """Tokens revealed per step: as even as possible, the first steps take the remainder."""
  steps = max(1, min(steps, num_new))
  counts = np.full((steps,), num_new // steps, np.int32)
  counts[:num_new % steps] += 1
  return counts


def greedy_unmask(model_config, params, prompt_ids_BxP, *, max_new_tokens: int, steps: int,
                  mask_id: int):
  """[B, P + N] tokens: each step reveals the most confident masked positions (argmax tokens)."""
  prompt_ids_BxP = jnp.asarray(prompt_ids_BxP, jnp.int32)
  b, _ = prompt_ids_BxP.shape
  canvas_BxT = jnp.concatenate(
      [prompt_ids_BxP, jnp.full((b, max_new_tokens), mask_id, jnp.int32)], axis=1)
  counts_S = jnp.asarray(reveal_counts(max_new_tokens, steps))

  @jax.jit
  def run(params, canvas_BxT):
    def body(i, canvas_BxT):
      logits_BxTxV = model_lib.apply(model_config, params, canvas_BxT).astype(jnp.float32)
      # Shift (SPEC §1): position i is predicted by the output at i-1.
      logits_BxTxV = jnp.concatenate([logits_BxTxV[:, :1], logits_BxTxV[:, :-1]], axis=1)
      probs_BxTxV = jax.nn.softmax(logits_BxTxV, axis=-1)
      masked_BxT = canvas_BxT == mask_id
      confidence_BxT = jnp.where(masked_BxT, probs_BxTxV.max(-1), -jnp.inf)
      rank_BxT = jnp.argsort(jnp.argsort(-confidence_BxT, axis=-1), axis=-1)
      reveal_BxT = masked_BxT & (rank_BxT < counts_S[i])
      return jnp.where(reveal_BxT, probs_BxTxV.argmax(-1).astype(jnp.int32), canvas_BxT)

    return jax.lax.fori_loop(0, counts_S.shape[0], body, canvas_BxT)

  return run(params, canvas_BxT)


def complete(config, model_config, params, tokenizer, prompt: str, *, max_new_tokens: int,
             steps: int, mesh=None) -> tuple[str, str]:
  """(completion text, which sampler produced it) for one prompt, greedy."""
  ids = tokenizer.encode(prompt)
  prompt_BxP = np.asarray([ids], np.int32)
  try:
    from dcjax.diffusion import sampler  # pylint: disable=import-outside-toplevel
    generate = getattr(sampler, "generate")
  except (ImportError, AttributeError):
    generate = None
  if generate is not None:
    out = generate(model_config, params, prompt_BxP, np.ones_like(prompt_BxP, bool),
                   max_new_tokens=max_new_tokens, steps=steps, alg="entropy", temperature=0.0,
                   rng=jax.random.key(config.seed), mesh=mesh)
    tokens, which = out.tokens, "dcjax.diffusion.sampler.generate (entropy, greedy)"
  else:
    tokens = greedy_unmask(model_config, params, prompt_BxP, max_new_tokens=max_new_tokens,
                           steps=steps, mask_id=model_config.mask_token_id)
    which = "fallback greedy_unmask (sampler not available)"
  new_ids = np.asarray(jax.device_get(tokens))[0, len(ids):].tolist()
  return tokenizer.decode(new_ids, skip_special_tokens=True), which
