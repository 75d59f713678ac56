"""Bidirectional grouped-query self-attention with q/k/v bias and RoPE."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.model.config import ModelConfig
from dcjax.model.layers import Dense
from dcjax.model.rope import apply_rope


def attend(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask_BxLxL):
  """softmax(q k^T / sqrt(Dh)) v with float32 softmax; masked keys get the float32 minimum.

  A query row whose keys are all masked (a pad row) gets a uniform distribution, so
  it stays finite instead of turning into NaN.
  """
  b, l, h, dh = q_BxLxHxDh.shape
  kv = k_BxLxKxDh.shape[2]
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, kv, h // kv, dh)
  scores_BxKxGxLxL = jnp.einsum("blkgd,bmkd->bkglm", q_BxLxKxGxDh, k_BxLxKxDh,
                                preferred_element_type=jnp.float32) * (dh ** -0.5)
  if mask_BxLxL is not None:
    scores_BxKxGxLxL = jnp.where(mask_BxLxL[:, None, None], scores_BxKxGxLxL,
                                 jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores_BxKxGxLxL, axis=-1).astype(v_BxLxKxDh.dtype)
  out_BxLxKxGxDh = jnp.einsum("bkglm,bmkd->blkgd", probs, v_BxLxKxDh)
  return out_BxLxKxGxDh.reshape(b, l, h, dh)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, cos_BxLxDh, sin_BxLxDh, mask_BxLxL):
    c = self.config

    def proj(heads, axes, name):
      return Dense(c, (heads, c.head_dim), ("embed",) + axes, bias_axes=axes, name=name)

    q = proj(c.num_heads, ("heads", "head_dim"), "q_proj")(x_BxLxD)
    k = proj(c.num_kv_heads, ("kv_heads", "head_dim"), "k_proj")(x_BxLxD)
    v = proj(c.num_kv_heads, ("kv_heads", "head_dim"), "v_proj")(x_BxLxD)
    q_BxLxHxDh = nn.with_logical_constraint(
        apply_rope(q, cos_BxLxDh, sin_BxLxDh),
        ("activation_batch", "activation_length", "activation_heads", "head_dim"))
    k_BxLxKxDh = nn.with_logical_constraint(
        apply_rope(k, cos_BxLxDh, sin_BxLxDh),
        ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"))
    v_BxLxKxDh = nn.with_logical_constraint(
        v, ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"))

    if c.attention_impl == "dot_product_attention":
      mask = None if mask_BxLxL is None else mask_BxLxL[:, None]
      out_BxLxHxDh = jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask=mask)
    else:
      out_BxLxHxDh = attend(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask_BxLxL)

    return Dense(c, (c.hidden_size,), ("heads", "head_dim", "embed"), contract=2,
                 name="o_proj")(out_BxLxHxDh)
