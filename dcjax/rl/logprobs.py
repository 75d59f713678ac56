"""Per-token log-probability estimators of a completion under a masked-diffusion model.

Every estimator is a set of forward passes over the same sequence [prompt, completion]; the
prompt is never masked. Pass p masks the completion tokens `masked_PxBxN[p]` and contributes
`coef_PxBxN[p] * lp_p` to each token, where `lp_p` is the fp32 log-softmax probability of
the clean token at that position (read through the logit shift: position P+j is predicted
by the output at P+j-1). The coefficient is zero wherever the pass leaves the token visible,
so each token is only ever read from passes in which it is masked.

  coupled (docs/grpo.md, DiffuCoder): pass 0 masks every completion token (coef 1/2); each of
    lambda pairs draws t ~ U(t_min, t_max) per sequence and u ~ U(0, 1) per token, then one
    pass masks u < t (coef 1/(2 lambda t)) and its complement masks u >= t
    (coef 1/(2 lambda (1 - t))). With lambda = 1:
        logp = 0.5 * (lp_full + (u < t ? lp_t / t : lp_t_hat / (1 - t))).
  decoupled (paper's ablation): pass 0 as above; 2 lambda passes, each with its own t and
    u, mask u < t with coef 1/(2 lambda t): the same weights and pass count, but a token
    may be masked in both or neither pass of a pair.
  full (d1-style ablation): one pass with every completion token masked, coef 1.

The noise (t, u) comes from one key, so the same key gives the same masks for the old,
reference and current policy of one iteration.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from dcjax import model as model_lib
from dcjax.model import head

ESTIMATORS = ("coupled", "decoupled", "full")


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
  """kind: coupled | decoupled | full; num_pairs: lambda; t ~ U(t_min, t_max).

  attention_mask: True (default) passes the prompt's keep-mask, so left padding is invisible
  and positions follow Dream's rule, as in the sampler: a completion's estimate does not
  depend on its batch-mates' prompt lengths or the pad multiple. False is the released
  trainer's scoring (every position visible, positions 0..L-1); with prompts padded to the
  batch's longest it reproduces the release (docs/grpo.md).
  """

  kind: str = "coupled"
  num_pairs: int = 1
  t_min: float = 0.2
  t_max: float = 0.8
  attention_mask: bool = True

  def validate(self, prefix: str = "config.rl") -> "EstimatorConfig":
    if self.kind not in ESTIMATORS:
      raise ValueError(f"{prefix}.estimator={self.kind!r} is not one of {ESTIMATORS}")
    if self.num_pairs < 1:
      raise ValueError(f"{prefix}.num_pairs={self.num_pairs} must be >= 1")
    if not 0 < self.t_min <= self.t_max < 1:
      raise ValueError(f"{prefix}.t_min={self.t_min}, {prefix}.t_max={self.t_max}: need "
                       "0 < t_min <= t_max < 1")
    return self

  @property
  def num_random(self) -> int:
    """Independent (t, u) draws: lambda (coupled), 2 lambda (decoupled), 0 (full)."""
    return {"coupled": self.num_pairs, "decoupled": 2 * self.num_pairs, "full": 0}[self.kind]

  @property
  def num_passes(self) -> int:
    """Forward passes per sequence."""
    return 1 if self.kind == "full" else 1 + 2 * self.num_pairs


@flax.struct.dataclass
class MaskNoise:
  """t_BxK: mask ratio per sequence and draw; u_BxKxN: per-token uniforms (K may be 0)."""

  t_BxK: jax.Array
  u_BxKxN: jax.Array


def draw_noise(key, batch: int, length: int, cfg: EstimatorConfig) -> MaskNoise:
  """The estimator's randomness for a [batch, length] completion block, from one key."""
  k_t, k_u = jax.random.split(key)
  k = cfg.num_random
  t_BxK = jax.random.uniform(k_t, (batch, k), jnp.float32, cfg.t_min, cfg.t_max)
  u_BxKxN = jax.random.uniform(k_u, (batch, k, length), jnp.float32)
  return MaskNoise(t_BxK=t_BxK, u_BxKxN=u_BxKxN)


def passes(noise: MaskNoise, cfg: EstimatorConfig):
  """(masked_PxBxN bool, coef_PxBxN float32) of the estimator's passes; pass 0 is full."""
  b, k, n = noise.u_BxKxN.shape
  full_mask = jnp.ones((1, b, n), bool)
  if cfg.kind == "full":
    return full_mask, jnp.ones((1, b, n), jnp.float32)
  lam = cfg.num_pairs
  t_KxBx1 = jnp.transpose(noise.t_BxK)[:, :, None]
  u_KxBxN = jnp.transpose(noise.u_BxKxN, (1, 0, 2))
  if cfg.kind == "coupled":
    below = u_KxBxN < t_KxBx1                                  # [lambda, B, N]
    masked = jnp.stack([below, ~below], axis=1).reshape(2 * lam, b, n)
    weight = jnp.stack([1.0 / t_KxBx1, 1.0 / (1.0 - t_KxBx1)], axis=1)
    weight = jnp.broadcast_to(weight, (lam, 2, b, n)).reshape(2 * lam, b, n)
  else:  # decoupled: 2 lambda independent masks, each weighted 1/t
    masked = u_KxBxN < t_KxBx1                                 # [2 lambda, B, N]
    weight = jnp.broadcast_to(1.0 / t_KxBx1, (2 * lam, b, n))
  coef = jnp.where(masked, 0.5 * weight / lam, 0.0)
  masked = jnp.concatenate([full_mask, masked], axis=0)
  coef = jnp.concatenate([jnp.full((1, b, n), 0.5, jnp.float32), coef], axis=0)
  return masked, coef.astype(jnp.float32)


def completion_logps(model_config, params, hidden_BxNxD, tokens_BxL, num_new: int, *,
                     with_entropy: bool = False, where_BxN=None):
  """fp32 log p(token) of the last `num_new` positions through the shift (and entropy).

  Position i is predicted by the output at i - 1, so the completion block [L-N, L) reads
  the final-norm hidden states of positions [L-N-1, L-1): `hidden_BxNxD` holds those rows
  (`model.hidden(..., rows=(L-N-1, N))`). The LM head runs in chunks of
  `model_config.logits_chunk` positions (`dcjax.model.head`). With `where_BxN`, only those
  completion tokens are scored (0 elsewhere).
  """
  l = tokens_BxL.shape[1]
  stats = head.token_logps(model_config, params, hidden_BxNxD, tokens_BxL[:, l - num_new:],
                           with_entropy=with_entropy, where=where_BxN)
  return stats["logp"], stats.get("entropy")


def per_token_logps(model_config, params, tokens_BxL, noise: MaskNoise, cfg: EstimatorConfig,
                    mask_id: int, *, keep_BxL=None, with_entropy: bool = False):
  """(logp_BxN, entropy_BxN or None): the estimate for the last N = noise's length tokens.

  `keep_BxL` (only read when cfg.attention_mask) is the prompt keep-mask extended with ones.
  The entropy is the predictive entropy of the all-masked pass (a diagnostic; no gradient).
  """
  model_config = model_lib.as_model_config(model_config)
  n = noise.u_BxKxN.shape[-1]
  if tokens_BxL.shape[1] <= n:
    raise ValueError(f"tokens_BxL has length {tokens_BxL.shape[1]} but the completion is {n} "
                     "tokens: the prompt must hold at least one token")
  masked_PxBxN, coef_PxBxN = passes(noise, cfg)
  b, l = tokens_BxL.shape
  num_passes = masked_PxBxN.shape[0]
  # Every pass in one forward of B * P rows, row b's passes adjacent (row b * P + p), so a
  # batch shard keeps its own rows and the matmuls see P times the rows (docs/grpo.md).
  masked_BxPxN = jnp.moveaxis(masked_PxBxN, 0, 1)
  noisy_BxPxN = jnp.where(masked_BxPxN, mask_id, tokens_BxL[:, None, l - n:])
  prompt_BxPxT = jnp.broadcast_to(tokens_BxL[:, None, :l - n], (b, num_passes, l - n))
  inputs_BPxL = jnp.concatenate([prompt_BxPxT, noisy_BxPxN], axis=2).reshape(-1, l)
  attention = None
  if cfg.attention_mask and keep_BxL is not None:
    attention = jnp.repeat(keep_BxL, num_passes, axis=0)
  # Only the rows the head reads come back; with the layer loop the last layer computes
  # only them, its MLP only those the passes score: pass 0 all, the others their masked
  # tokens (docs/model.md, "Rows the head reads").
  hidden_BPxNxD = model_lib.hidden(model_config, params, inputs_BPxL, attention,
                                   rows=(l - n - 1, n), wanted=masked_BxPxN.reshape(-1, n))
  hidden_BxPxNxD = hidden_BPxNxD.reshape(b, num_passes, n, -1)
  # Pass 0 reads every completion token; the masked passes only their masked ones (coef
  # is 0 elsewhere), so for them the LM head skips the rest (docs/attention.md).
  lp_0, ent = completion_logps(model_config, params, hidden_BxPxNxD[:, 0], tokens_BxL, n,
                               with_entropy=with_entropy)
  lp_BxPxN = lp_0[:, None]
  if num_passes > 1:
    lp_rest = completion_logps(
        model_config, params, hidden_BxPxNxD[:, 1:].reshape(-1, n, hidden_BPxNxD.shape[-1]),
        jnp.repeat(tokens_BxL, num_passes - 1, axis=0), n,
        where_BxN=masked_BxPxN[:, 1:].reshape(-1, n))[0]
    lp_BxPxN = jnp.concatenate([lp_BxPxN, lp_rest.reshape(b, num_passes - 1, n)], axis=1)
  logp_BxN = jnp.zeros((b, n), jnp.float32)
  for p in range(num_passes):
    logp_BxN = logp_BxN + coef_PxBxN[p] * lp_BxPxN[:, p]
  entropy_BxN = None if ent is None else jax.lax.stop_gradient(ent)
  return logp_BxN, entropy_BxN
