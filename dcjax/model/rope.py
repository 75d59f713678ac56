"""Rotary position embedding, `rotate_half` convention (frequencies concatenated twice)."""

import jax
import jax.numpy as jnp


def rope_cos_sin(positions_BxL: jnp.ndarray, head_dim: int, theta: float):
  """cos, sin of shape [B, L, head_dim], computed in float32."""
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponent)
  freqs_BxLxK = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  emb_BxLxDh = jnp.concatenate([freqs_BxLxK, freqs_BxLxK], axis=-1)
  return jnp.cos(emb_BxLxDh), jnp.sin(emb_BxLxDh)


@jax.custom_vjp
def apply_rope(x_BxLxHxDh: jnp.ndarray, cos_BxLxDh: jnp.ndarray, sin_BxLxDh: jnp.ndarray):
  """x * cos + rotate_half(x) * sin in float32, cast back to x's dtype.

  The backward (`_apply_rope_bwd`) is the same expression with rotate_half transposed:
  dx = dy * cos + rotate_half^T(dy * sin), one loop over dy, where differentiating the
  concatenate gave pads and adds (the tiny model's step 1.4 ms faster, docs/performance.md).
  The same products and sums, so the same bits. cos and sin get no gradient (they are
  functions of integer positions)."""
  x = x_BxLxHxDh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BxLxDh[:, :, None, :] + rotated * sin_BxLxDh[:, :, None, :]
  return out.astype(x_BxLxHxDh.dtype)


def _apply_rope_fwd(x_BxLxHxDh, cos_BxLxDh, sin_BxLxDh):
  return apply_rope(x_BxLxHxDh, cos_BxLxDh, sin_BxLxDh), (cos_BxLxDh, sin_BxLxDh)


def _apply_rope_bwd(residuals, dy_BxLxHxDh):
  cos_BxLxDh, sin_BxLxDh = residuals
  dy = dy_BxLxHxDh.astype(jnp.float32)
  z = dy * sin_BxLxDh[:, :, None, :]
  half = z.shape[-1] // 2
  dx = dy * cos_BxLxDh[:, :, None, :] + jnp.concatenate([z[..., half:], -z[..., :half]], axis=-1)
  return dx.astype(dy_BxLxHxDh.dtype), None, None


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)
