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
  it stays finite instead of turning into NaN. The backward is written out (`_attend_bwd`,
  docs/attention.md, "Plain (`xla`)"): the same products as differentiating this formula,
  with operand layouts chosen for XLA:CPU's matmuls.
  """
  return _attend(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxWxS)


def _grouped(x_BxWxHxDh, kv: int, transposed: bool = False):
  """[B, W, H, Dh] -> [B, K, G*W, Dh] (query head h = k * G + g), or [B, K, Dh, G*W]."""
  b, w, h, dh = x_BxWxHxDh.shape
  x = x_BxWxHxDh.reshape(b, w, kv, h // kv, dh)
  x = x.transpose(0, 2, 4, 3, 1) if transposed else x.transpose(0, 2, 3, 1, 4)
  return x.reshape((b, kv, dh, -1) if transposed else (b, kv, -1, dh))


def _ungrouped(x_BxKxGWxDh, h: int):
  b, kv, gw, dh = x_BxKxGWxDh.shape
  return (x_BxKxGWxDh.reshape(b, kv, h // kv, gw * kv // h, dh).transpose(0, 3, 1, 2, 4)
          .reshape(b, gw * kv // h, h, dh))


def _grouped_mask(mask_BxWxS, g: int):
  """[B, W, S] -> [B, 1, G*W, S], broadcast over the query heads of a kv head."""
  b, w, s = mask_BxWxS.shape
  return jnp.broadcast_to(mask_BxWxS[:, None, None], (b, 1, g, w, s)).reshape(b, 1, g * w, s)


@jax.custom_vjp
def _attend(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxWxS):
  return _attend_fwd(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxWxS)[0]


def _attend_fwd(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxWxS):
  """Scores [B, K, G*W, S]: the G query heads of a kv head are one matmul's rows, taken from
  q and k stored [Dh, G*W] and [Dh, S] (the transposed q is also what the backward needs
  for dK; a [G*W, Dh] copy of q would be one more transposing pass)."""
  h, dh = q_BxWxHxDh.shape[2:]
  kv = k_BxSxKxDh.shape[2]
  qT_BxKxDhxGW = _grouped(q_BxWxHxDh, kv, transposed=True)
  k_BxKxSxDh = k_BxSxKxDh.transpose(0, 2, 1, 3)
  v_BxKxSxDh = v_BxSxKxDh.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkdq,bkds->bkqs", qT_BxKxDhxGW, k_BxSxKxDh.transpose(0, 2, 3, 1),
                      preferred_element_type=jnp.float32) * (dh ** -0.5)
  if mask_BxWxS is not None:
    scores = jnp.where(_grouped_mask(mask_BxWxS, h // kv), scores, jnp.finfo(jnp.float32).min)
  probs_BxKxGWxS = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxDh.dtype)
  out_BxKxGWxDh = jnp.einsum("bkqs,bksd->bkqd", probs_BxKxGWxS, v_BxKxSxDh)
  residuals = (qT_BxKxDhxGW, k_BxKxSxDh, v_BxKxSxDh, probs_BxKxGWxS, out_BxKxGWxDh,
               mask_BxWxS)
  return _ungrouped(out_BxKxGWxDh, h), residuals


def _attend_bwd(residuals, d_out_BxWxHxDh):
  """dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)) (the softmax's backward: rowsum(dO O)
  = rowsum(dP P)), masked entries 0, dQ = dS K / sqrt(Dh), dK = dS^T Q / sqrt(Dh). The
  products with P^T and dS^T are taken as [Dh, G*W] x [G*W, S] (q and dO stored transposed)."""
  qT_BxKxDhxGW, k_BxKxSxDh, v_BxKxSxDh, probs, out_BxKxGWxDh, mask_BxWxS = residuals
  b, w, h, dh = d_out_BxWxHxDh.shape
  kv = k_BxKxSxDh.shape[1]
  dtype = v_BxKxSxDh.dtype
  d_out = _grouped(d_out_BxWxHxDh, kv)
  dvT_BxKxDhxS = jnp.einsum("bkdq,bkqs->bkds", _grouped(d_out_BxWxHxDh, kv, transposed=True),
                            probs)
  d_probs = jnp.einsum("bkqd,bksd->bkqs", d_out, v_BxKxSxDh,
                       preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out_BxKxGWxDh.astype(jnp.float32), axis=-1,
                keepdims=True)
  d_scores = probs.astype(jnp.float32) * (d_probs - row)
  if mask_BxWxS is not None:
    d_scores = jnp.where(_grouped_mask(mask_BxWxS, h // kv), d_scores, 0.0)
  d_scores = (d_scores * (dh ** -0.5)).astype(dtype)
  dq = jnp.einsum("bkqs,bksd->bkqd", d_scores, k_BxKxSxDh)
  dkT_BxKxDhxS = jnp.einsum("bkdq,bkqs->bkds", qT_BxKxDhxGW, d_scores)
  return (_ungrouped(dq, h).astype(qT_BxKxDhxGW.dtype),
          dkT_BxKxDhxS.transpose(0, 3, 1, 2).astype(k_BxKxSxDh.dtype),
          dvT_BxKxDhxS.transpose(0, 3, 1, 2).astype(dtype), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


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
