"""Scores of lm-eval's loglikelihood requests for a masked-diffusion model (docs/lm_eval.md).

A diffusion model has no exact log p(continuation | context); evaluations use the ELBO's
Monte-Carlo estimate over masks of the continuation alone (the context is never masked):

  draw j = 1..mc_num:  k_j tokens of the n-token continuation masked, chosen uniformly;
                       score_j = (n / k_j) * sum over the masked tokens of log p(token)
  estimate = mean_j score_j

with k_j stratified over 1..n (a random offset, then evenly spaced, as LLaDA's evaluation
draws it), so each k_j is uniform on {1..n} and the estimate is unbiased for

  ELBO = sum_{k=1..n} (1/k) E_{|M|=k}[ sum_{i in M} log p(x_i | x with M masked) ],

which is also what Dream's `t ~ U(0, 1]`, mask-each-token-with-probability-t, weight-1/t form
averages to (integrate the binomial over t). `greedy_matches` is LLaDA's greedy check: decode
the continuation one token per step, most confident masked position first, and report whether
every revealed token is the continuation's.

Host side: `draw_masks` (numpy). Device side: `masked_logps` and `greedy_matches`, jitted on
fixed [B, L] canvases whose last C positions hold the right-aligned continuation; left
padding is invisible (keep-mask attention, Dream's positions; docs/model.md).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from dcjax import model as model_lib
from dcjax.model.config import ModelConfig
from dcjax.model.transformer import mask_and_positions


def request_rng(seed: int, context_ids, continuation_ids) -> np.random.Generator:
  """The mask draws of one request depend only on the seed and its tokens, not on which
  other requests share its batch or in which order the harness sends them."""
  data = np.asarray(list(context_ids) + [-1] + list(continuation_ids), np.int64).tobytes()
  return np.random.default_rng([int(seed), zlib.crc32(data)])


def draw_masks(n: int, mc_num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(masked bool [mc_num, n], weight float64 [mc_num] = n / k_j) for an n-token continuation:
  draw j masks k_j = (offset + floor(j n / mc_num)) mod n + 1 positions chosen uniformly."""
  if n < 1 or mc_num < 1:
    raise ValueError(f"need n >= 1 and mc_num >= 1, got n={n}, mc_num={mc_num}")
  offset = int(rng.integers(n))
  k_J = (offset + (np.arange(mc_num) * n) // mc_num) % n + 1
  masked_JxN = np.zeros((mc_num, n), bool)
  for j, k in enumerate(k_J):
    masked_JxN[j, rng.permutation(n)[:k]] = True
  return masked_JxN, n / k_J.astype(np.float64)


def _window_logits(config: ModelConfig, params, noisy_BxL, keep_BxL, cont_len: int):
  """fp32 logits [B, C, V] for the last C positions, shifted: position i reads output i - 1."""
  length = noisy_BxL.shape[1]
  mask, positions_BxL = mask_and_positions(noisy_BxL, keep_BxL)
  _, logits_BxCxV = model_lib.forward(config, params, noisy_BxL, positions_BxL, mask,
                                      logits_start=length - cont_len - 1,
                                      logits_length=cont_len)
  return logits_BxCxV.astype(jnp.float32)


def _noisy(config: ModelConfig, tokens_BxL, masked_BxC):
  b, length = tokens_BxL.shape
  pad_BxP = jnp.zeros((b, length - masked_BxC.shape[1]), bool)
  masked_BxL = jnp.concatenate([pad_BxP, masked_BxC], axis=1)
  return jnp.where(masked_BxL, jnp.asarray(config.mask_token_id, tokens_BxL.dtype), tokens_BxL)


@functools.partial(jax.jit, static_argnames=("config",))
def masked_logps(config: ModelConfig, params, tokens_BxL, keep_BxL, masked_BxC):
  """[B, C] fp32 log p(clean token) at the masked positions of the last C canvas positions
  (0 elsewhere), the masked ones replaced by the mask token in the model's input."""
  cont_len = masked_BxC.shape[1]
  logits_BxCxV = _window_logits(config, params, _noisy(config, tokens_BxL, masked_BxC),
                                keep_BxL, cont_len)
  logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
  target_BxC = tokens_BxL[:, -cont_len:]
  logp_BxC = jnp.take_along_axis(logp_BxCxV, target_BxC[..., None], axis=-1)[..., 0]
  return jnp.where(masked_BxC, logp_BxC, 0.0)


@functools.partial(jax.jit, static_argnames=("config",))
def greedy_matches(config: ModelConfig, params, tokens_BxL, keep_BxL, cont_BxC):
  """[B] bool: one-token-per-step greedy decoding of the continuation (positions `cont_BxC`
  of the last C, all masked at first) reveals exactly the continuation. Each step proposes
  the argmax over the tokens other than the mask and reveals the masked position whose
  proposal has the highest probability (lowest position on ties; the distribution includes
  the mask token, as the sampler's confidences do). A row stops at its first wrong token."""
  cont_len = cont_BxC.shape[1]
  target_BxC = tokens_BxL[:, -cont_len:]
  vocab = jnp.arange(config.vocab_size)

  def step(carry):
    i, masked_BxC, ok_B = carry
    logits_BxCxV = _window_logits(config, params, _noisy(config, tokens_BxL, masked_BxC),
                                  keep_BxL, cont_len)
    probs_BxCxV = jax.nn.softmax(logits_BxCxV, axis=-1)
    proposal_BxC = jnp.argmax(
        jnp.where(vocab == config.mask_token_id, -jnp.inf, logits_BxCxV), axis=-1)
    conf_BxC = jnp.take_along_axis(probs_BxCxV, proposal_BxC[..., None], axis=-1)[..., 0]
    pick_B = jnp.argmax(jnp.where(masked_BxC, conf_BxC, -jnp.inf), axis=-1)
    active_B = ok_B & jnp.any(masked_BxC, axis=-1)
    rows = jnp.arange(masked_BxC.shape[0])
    right_B = proposal_BxC[rows, pick_B] == target_BxC[rows, pick_B]
    ok_B = ok_B & (~active_B | right_B)
    masked_BxC = masked_BxC.at[rows, pick_B].set(masked_BxC[rows, pick_B] & ~active_B)
    return i + 1, masked_BxC, ok_B

  def running(carry):
    i, masked_BxC, ok_B = carry
    return (i < cont_len) & jnp.any(ok_B & jnp.any(masked_BxC, axis=-1))

  ok_B = jnp.ones(cont_BxC.shape[:1], bool)
  _, _, ok_B = jax.lax.while_loop(running, step, (0, cont_BxC.astype(bool), ok_B))
  return ok_B
