"""Bidirectional grouped-query self-attention with q/k/v bias and RoPE."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.model import masks
from dcjax.model.blockwise import blockwise_attention
from dcjax.model.config import ModelConfig
from dcjax.model.layers import Dense
from dcjax.model.rope import apply_rope

ACT_Q = ("activation_batch", "activation_length", "activation_heads", "head_dim")
ACT_KV = ("activation_batch", "activation_length", "activation_kv_heads", "head_dim")


def attend(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxWxS):
  """softmax(q k^T / sqrt(Dh)) v with float32 softmax; masked keys get the float32 minimum.

  A query row whose keys are all masked (a pad row) gets a uniform distribution, so
  it stays finite instead of turning into NaN.
  """
  b, w, h, dh = q_BxWxHxDh.shape
  kv = k_BxSxKxDh.shape[2]
  q_BxWxKxGxDh = q_BxWxHxDh.reshape(b, w, kv, h // kv, dh)
  scores_BxKxGxWxS = jnp.einsum("blkgd,bmkd->bkglm", q_BxWxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32) * (dh ** -0.5)
  if mask_BxWxS is not None:
    scores_BxKxGxWxS = jnp.where(mask_BxWxS[:, None, None], scores_BxKxGxWxS,
                                 jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores_BxKxGxWxS, axis=-1).astype(v_BxSxKxDh.dtype)
  out_BxWxKxGxDh = jnp.einsum("bkglm,bmkd->blkgd", probs, v_BxSxKxDh)
  return out_BxWxKxGxDh.reshape(b, w, h, dh)


class KVCache(NamedTuple):
  """Keys (after RoPE) and values of every key position: [B, S, K, Dh] each, or stacked per
  layer [NL, B, S, K, Dh] when returned by the Transformer."""

  k: jax.Array
  v: jax.Array


def attention_kernel(config: ModelConfig, q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask):
  """The configured attention implementation (`config.attention_impl`, docs/attention.md).

  `mask` is None, a boolean [B, W, S] or `masks.Segments`. `splash` takes segments only, and
  lengths that are multiples of 128; anything else (the annealed adaptation mask, the
  sampler's cache windows, short test shapes) runs `blockwise`.
  """
  impl = config.attention_impl
  w, s = q_BxWxHxDh.shape[1], k_BxSxKxDh.shape[1]
  if (impl == "splash" and (mask is None or isinstance(mask, masks.Segments))
      and w % 128 == 0 and s % 128 == 0):
    from dcjax.model.splash import splash_attention  # Pallas TPU; imported only when used
    return splash_attention(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)
  if impl in ("splash", "blockwise"):
    return blockwise_attention(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)
  if impl in ("dot_product_attention", "cudnn"):
    dense_BxWxS = masks.dense(mask)
    return jax.nn.dot_product_attention(
        q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh,
        mask=None if dense_BxWxS is None else dense_BxWxS[:, None],
        implementation="cudnn" if impl == "cudnn" else None)
  return attend(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, masks.dense(mask))


class Attention(nn.Module):
  """Attention of W query positions over S key positions; returns (cache, out).

  Without a cache, the keys are the W positions themselves (S = W) and the returned cache is
  their K/V. With a cache (the whole canvas, S positions), the W fresh K/V replace the cache's
  entries at [cache_start, cache_start + W) before attending, and the updated cache is
  returned (Fast-dLLM's block cache, docs/sampler.md). `cache_start` may be traced.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxWxD, cos_BxWxDh, sin_BxWxDh, mask_BxWxS, cache: KVCache | None = None,
               cache_start=0, query_rows: tuple[int, int] | None = None):
    """`query_rows=(start, length)` (static): only those of the W rows query (keys and values
    still come from all W); the output is [B, length, D]."""
    c = self.config

    def proj(heads, axes, name):
      return Dense(c, (heads, c.head_dim), ("embed",) + axes, bias_axes=axes, name=name)

    x_q, cos_q, sin_q, mask_q = x_BxWxD, cos_BxWxDh, sin_BxWxDh, mask_BxWxS
    if query_rows is not None:
      rows = slice(query_rows[0], query_rows[0] + query_rows[1])
      x_q, cos_q, sin_q = x_BxWxD[:, rows], cos_BxWxDh[:, rows], sin_BxWxDh[:, rows]
      if isinstance(mask_BxWxS, masks.Segments):
        mask_q = masks.Segments(mask_BxWxS.q[:, rows], mask_BxWxS.kv)
      elif mask_BxWxS is not None:
        mask_q = mask_BxWxS[:, rows]
    q = proj(c.num_heads, ("heads", "head_dim"), "q_proj")(x_q)
    k = proj(c.num_kv_heads, ("kv_heads", "head_dim"), "k_proj")(x_BxWxD)
    v = proj(c.num_kv_heads, ("kv_heads", "head_dim"), "v_proj")(x_BxWxD)
    q_BxWxHxDh = nn.with_logical_constraint(apply_rope(q, cos_q, sin_q), ACT_Q)
    k_BxWxKxDh = nn.with_logical_constraint(apply_rope(k, cos_BxWxDh, sin_BxWxDh), ACT_KV)
    v_BxWxKxDh = nn.with_logical_constraint(v, ACT_KV)
    if cache is None:
      cache = KVCache(k_BxWxKxDh, v_BxWxKxDh)
    else:
      cache = KVCache(*(jax.lax.dynamic_update_slice_in_dim(
          old, new.astype(old.dtype), cache_start, axis=1)
                        for old, new in zip(cache, (k_BxWxKxDh, v_BxWxKxDh))))
    out_BxWxHxDh = attention_kernel(c, q_BxWxHxDh, cache.k, cache.v, mask_q)
    return cache, Dense(c, (c.hidden_size,), ("heads", "head_dim", "embed"), contract=2,
                        name="o_proj")(out_BxWxHxDh)
