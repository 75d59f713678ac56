"""CART (Dream's context-adaptive token-level reweighting), docs/losses.md.

A masked token n gets the weight `0.5 * sum over unmasked i of p (1 - p)^(|n - i| - 1)`
in place of 1/t: tokens with much clean context nearby count more.
"""

from __future__ import annotations

import jax.numpy as jnp


def geometric_kernel(length: int, p: float):
  """[L, L] with p (1 - p)^(|n - i| - 1) off the diagonal and 0 on it (float32)."""
  idx = jnp.arange(length)
  dist_LxL = jnp.abs(idx[:, None] - idx[None, :])
  decay_LxL = p * jnp.power(1.0 - p, jnp.maximum(dist_LxL - 1, 0).astype(jnp.float32))
  return jnp.where(dist_LxL > 0, decay_LxL, 0.0).astype(jnp.float32)


def cart_weights(masked_BxL, keep_BxL, p: float = 0.3):
  """[B, L] CART weight of every position (meaningful where the token is masked).

  `keep_BxL` marks real tokens: padding and truncated tails are not context.
  """
  unmasked_BxL = (keep_BxL & ~masked_BxL).astype(jnp.float32)
  kernel_LxL = geometric_kernel(masked_BxL.shape[1], p)  # symmetric
  return 0.5 * jnp.einsum("bi,ni->bn", unmasked_BxL, kernel_LxL)
