"""Rotary position embedding, `rotate_half` convention (frequencies concatenated twice)."""

import jax.numpy as jnp


def rope_cos_sin(positions_BxL: jnp.ndarray, head_dim: int, theta: float):
  """cos, sin of shape [B, L, head_dim], computed in float32."""
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponent)
  freqs_BxLxK = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  emb_BxLxDh = jnp.concatenate([freqs_BxLxK, freqs_BxLxK], axis=-1)
  return jnp.cos(emb_BxLxDh), jnp.sin(emb_BxLxDh)


def apply_rope(x_BxLxHxDh: jnp.ndarray, cos_BxLxDh: jnp.ndarray, sin_BxLxDh: jnp.ndarray):
  """x * cos + rotate_half(x) * sin in float32, cast back to x's dtype."""
  x = x_BxLxHxDh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BxLxDh[:, :, None, :] + rotated * sin_BxLxDh[:, :, None, :]
  return out.astype(x_BxLxHxDh.dtype)
