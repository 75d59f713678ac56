"""Token proposals and confidences (Dream's `sample_tokens`, docs/sampler.md), and position picking.

All in float32 whatever the model's compute dtype. Filtered-out vocabulary entries get
-inf (Dream writes the float minimum; both give probability exactly 0 after softmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONFIDENCE_ALGS = ("maskgit_plus", "topk_margin", "entropy")
_RANDOM_STREAM = 0x52414E44  # folded into the step key: alg='random' draws its own numbers


def top_p_filter(logits_NxV: jax.Array, top_p) -> jax.Array:
  """Keeps the most probable tokens up to and including the first whose cumulative
  probability exceeds `top_p` (the token that crosses p is kept); -inf elsewhere.

  Tokens tied in value with the last kept one are kept too (torch's order among exact
  ties is unspecified anyway).
  """
  sorted_NxV = jnp.flip(jnp.sort(logits_NxV, axis=-1), axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_NxV, axis=-1), axis=-1)
  # Position j is removed when the cumulative mass *before* it already exceeds p.
  removed = jnp.concatenate(
      [jnp.zeros_like(cumulative[..., :1], bool), cumulative[..., :-1] > top_p], axis=-1)
  num_kept = jnp.sum(~removed, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(sorted_NxV, num_kept - 1, axis=-1)
  return jnp.where(logits_NxV < cutoff, -jnp.inf, logits_NxV)


def top_k_filter(logits_NxV: jax.Array, top_k: int) -> jax.Array:
  """Removes tokens whose logit is below the k-th largest (ties with it are kept)."""
  k = min(int(top_k), logits_NxV.shape[-1])
  kth = jax.lax.top_k(logits_NxV, k)[0][..., -1:]
  return jnp.where(logits_NxV < kth, -jnp.inf, logits_NxV)


def filtered_logits(logits_NxV: jax.Array, *, temperature=None, top_p=None,
                    top_k: int | None = None) -> jax.Array:
  """float32 logits / temperature (when given), then top-p, then top-k, as Dream orders them."""
  x = logits_NxV.astype(jnp.float32)
  if temperature is not None:
    x = x / temperature
  if top_p is not None:
    x = top_p_filter(x, top_p)
  if top_k is not None:
    x = top_k_filter(x, top_k)
  return x


def propose(logits_NxV: jax.Array, rng: jax.Array | None, *, alg: str, temperature=None,
            top_p=None, top_k: int | None = None, forbidden_token: int | None = None):
  """Dream's `sample_tokens` over the last axis (docs/sampler.md, "Proposals").

  Dream's distribution is the tempered, top-p / top-k filtered softmax of the logits, the
  mask token included. Every confidence is read from it: the proposed token's probability
  (`maskgit_plus`, `origin`, and the threshold rule), p1 - p2 (`topk_margin`), or
  sum p log(p + 1e-10) (`entropy`). Only the choice of token differs from Dream:
  `forbidden_token` (the sampler passes the mask id) is never proposed, so the argmax, or the
  sample when `temperature` is given, is over the other tokens Dream's filters kept (over all
  other tokens when the filters kept the mask token alone). `temperature` None is greedy
  (Dream's temperature 0). Returns (token int32, confidence float32, probability of the
  proposed token float32), each shaped like `logits_NxV[..., 0]`.
  """
  x = filtered_logits(logits_NxV, temperature=temperature, top_p=top_p, top_k=top_k)
  probs = jax.nn.softmax(x, axis=-1)
  choice = x
  if forbidden_token is not None:
    choice = x.at[..., forbidden_token].set(-jnp.inf)
    fallback = logits_NxV.astype(jnp.float32).at[..., forbidden_token].set(-jnp.inf)
    if temperature is not None:
      fallback = fallback / temperature
    nothing_left = jnp.all(choice == -jnp.inf, axis=-1, keepdims=True)
    choice = jnp.where(nothing_left, fallback, choice)
  if temperature is None:
    token = jnp.argmax(choice, axis=-1)
  else:
    if rng is None:
      raise ValueError("propose: sampling (temperature > 0) needs an rng key")
    token = jax.random.categorical(rng, choice, axis=-1)
  token = token.astype(jnp.int32)
  prob = jnp.take_along_axis(probs, token[..., None], axis=-1)[..., 0]
  if alg in ("maskgit_plus", "origin"):
    confidence = prob
  elif alg == "topk_margin":
    # Two O(V) reductions instead of lax.top_k(probs, 2), a sort on XLA:CPU: the largest
    # probability, then the largest of the rest (equal to it when the maximum is tied).
    first = jnp.argmax(probs, axis=-1)
    p1 = jnp.take_along_axis(probs, first[..., None], axis=-1)[..., 0]
    rest = jnp.where(jnp.arange(probs.shape[-1]) == first[..., None], -jnp.inf, probs)
    confidence = p1 - jnp.max(rest, axis=-1)
  elif alg == "entropy":
    confidence = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
  else:
    raise ValueError(f"alg={alg!r} is not one of ('origin',) + {CONFIDENCE_ALGS}")
  return token, confidence, prob


def descending_rank(score_BxN: jax.Array, tier_BxN: jax.Array | None = None) -> jax.Array:
  """Rank of each entry in its row, 0 = largest; ties rank the lower index first.

  With `tier_BxN` (int), entries rank by tier first (lower tier first), then by score: the
  sampler puts end-token proposals (`confidence_eos_eot_inf`, confidence -inf) after every
  other masked position but before the unmasked ones, so a scheduled count is always met.
  """
  if tier_BxN is None:
    order = jnp.argsort(-score_BxN, axis=-1, stable=True)
  else:
    index = jax.lax.broadcasted_iota(jnp.int32, score_BxN.shape, score_BxN.ndim - 1)
    order = jax.lax.sort((tier_BxN.astype(jnp.int32), -score_BxN, index),
                         dimension=score_BxN.ndim - 1, num_keys=2, is_stable=True)[2]
  ranks = jnp.argsort(order, axis=-1, stable=True)
  return ranks.astype(jnp.int32)


def position_scores(confidence_BxN: jax.Array, masked_BxN: jax.Array, rng=None,
                    alg_temp=None) -> jax.Array:
  """Scores whose top-k are the positions to reveal; -inf at unmasked positions.

  With `alg_temp`, `confidence / alg_temp + Gumbel` (the Gumbel top-k trick): its top k
  are k draws without replacement from softmax(confidence / alg_temp), which is Dream's
  `torch.multinomial(softmax(conf / alg_temp), k)`.
  """
  score = jnp.where(masked_BxN, confidence_BxN.astype(jnp.float32), -jnp.inf)
  if alg_temp is not None:
    if rng is None:
      raise ValueError("position_scores: alg_temp sampling needs an rng key")
    score = score / alg_temp + jax.random.gumbel(rng, score.shape, jnp.float32)
  return score


def random_confidence(rng: jax.Array, step, shape) -> jax.Array:
  """LLaDA's `remasking='random'` (the sampler's alg='random'): a uniform [0, 1) confidence
  per position, drawn from `rng` folded with the step number and a fixed stream tag, apart
  from the proposal and position draws (tests replay these numbers in a torch port)."""
  key = jax.random.fold_in(jax.random.fold_in(rng, step), _RANDOM_STREAM)
  return jax.random.uniform(key, shape, jnp.float32)
