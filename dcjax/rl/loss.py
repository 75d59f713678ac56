"""The coupled-GRPO objective (docs/grpo.md): PPO clipping plus a k3 KL penalty, token-level mean.

Per valid completion token, with ratio r = exp(logp - old_logp) and advantage A of its
sequence:
    loss_tok = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * kl,
    kl       = exp(ref - logp) - (ref - logp) - 1          (k3, >= 0)
The loss is the sum over valid tokens divided by their count (at least 1). A token is
"clipped" when the clipped branch is active: r < 1 - eps_low with A < 0, or r > 1 + eps_high
with A > 0 (as the released trainer counts it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  epsilon_low: float = 0.5
  epsilon_high: float = 0.5
  beta: float = 0.01


def k3_kl(logp_BxN, ref_logp_BxN):
  """exp(ref - logp) - (ref - logp) - 1, elementwise (fp32)."""
  delta = ref_logp_BxN - logp_BxN
  return jnp.exp(delta) - delta - 1.0


def grpo_loss(logp_BxN, old_logp_BxN, ref_logp_BxN, advantages_B, mask_BxN,
              cfg: PolicyLossConfig):
  """(loss, sums) for one micro-batch.

  `old_logp_BxN` None means on-policy (mu = 1): old = stop_gradient(logp), so the ratio is
  exactly 1. `ref_logp_BxN` is ignored when cfg.beta == 0. `sums` holds token sums for the
  metrics: tokens, clipped, kl, ratio.
  """
  logp = logp_BxN.astype(jnp.float32)
  old = jax.lax.stop_gradient(logp) if old_logp_BxN is None else old_logp_BxN
  mask = mask_BxN.astype(jnp.float32)
  adv_Bx1 = advantages_B.astype(jnp.float32)[:, None]
  ratio = jnp.exp(logp - old)
  clipped_ratio = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
  per_token = -jnp.minimum(ratio * adv_Bx1, clipped_ratio * adv_Bx1)
  kl = jnp.zeros_like(logp)
  if cfg.beta:
    kl = k3_kl(logp, ref_logp_BxN)
    per_token = per_token + cfg.beta * kl
  count = jnp.sum(mask)
  loss = jnp.sum(per_token * mask) / jnp.maximum(count, 1.0)
  is_clipped = (((ratio < 1.0 - cfg.epsilon_low) & (adv_Bx1 < 0))
                | ((ratio > 1.0 + cfg.epsilon_high) & (adv_Bx1 > 0)))
  sums = dict(tokens=count, clipped=jnp.sum(is_clipped * mask),
              kl=jnp.sum(jax.lax.stop_gradient(kl) * mask),
              ratio=jnp.sum(jax.lax.stop_gradient(ratio) * mask))
  return loss, sums
