"""Memory-efficient ("blockwise", FlashAttention-style) attention in pure JAX (docs/attention.md).

The same numbers as the plain `attend` (dcjax/model/attention.py) without its [B, H, W, S]
scores: a `lax.scan` over key blocks keeps an online softmax (running max and sum in float32),
and a `jax.custom_vjp` backward (FlashAttention-2) recomputes each block's probabilities from
the saved softmax statistics instead of storing them. Residuals: q, k, v, the mask, the output
and the per-row statistics (max, sum) [B, K, G, W]; nothing [W, S]-sized.

Masks are the forms of dcjax/model/masks.py; each block's mask is sliced from a dense one or
computed from the block's segment ids. Masked scores get the float32 minimum, as in `attend`,
so a query row with every key masked comes out uniform over all keys.

Blocks: `bk = min(block_k, S)` and ceil(S / bk) blocks. When bk does not divide S the last block
is shifted back to end at S (`dynamic_slice` clamps its start) and its keys that the previous
block already covered score -inf: they add exactly zero, even to a fully masked row (whose
running max stays at the float32 minimum), and every key is counted once. No padding, no
divisor search (a prime S would otherwise give one-key blocks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dcjax.model.masks import Segments

MASKED = jnp.finfo(jnp.float32).min


def _layout(q_BxWxHxDh, k_BxSxKxDh, block_k):
  """(grouped q [B, W, K, G, Dh], block size, number of blocks, scale)."""
  b, w, h, dh = q_BxWxHxDh.shape
  s, kv = k_BxSxKxDh.shape[1:3]
  if h % kv:
    raise ValueError(f"{h} query heads are not a multiple of {kv} kv heads")
  bk = min(block_k, s)
  return q_BxWxHxDh.reshape(b, w, kv, h // kv, dh), bk, -(-s // bk), dh ** -0.5


def _block(q_BxWxKxGxDh, k_BxSxKxDh, v_BxSxKxDh, mask, j, bk, scale):
  """Block j's keys and values [B, bk, K, Dh], masked scores [B, K, G, W, bk] (float32) and
  keep mask [B, 1, 1, W, bk] (None where every key is kept)."""
  s = k_BxSxKxDh.shape[1]
  start = j * bk
  k_BxbkxKxDh = jax.lax.dynamic_slice_in_dim(k_BxSxKxDh, start, bk, axis=1)
  v_BxbkxKxDh = jax.lax.dynamic_slice_in_dim(v_BxSxKxDh, start, bk, axis=1)
  scores_BxKxGxWxbk = jnp.einsum("blkgd,bmkd->bkglm", q_BxWxKxGxDh, k_BxbkxKxDh,
                                 preferred_element_type=jnp.float32) * scale
  if isinstance(mask, Segments):
    kv_Bxbk = jax.lax.dynamic_slice_in_dim(mask.kv, start, bk, axis=1)
    keep_BxWxbk = mask.q[:, :, None] == kv_Bxbk[:, None, :]
  elif mask is not None:
    keep_BxWxbk = jax.lax.dynamic_slice_in_dim(mask, start, bk, axis=2)
  else:
    keep_BxWxbk = None
  if keep_BxWxbk is not None:
    keep_BxWxbk = keep_BxWxbk[:, None, None]
    scores_BxKxGxWxbk = jnp.where(keep_BxWxbk, scores_BxKxGxWxbk, MASKED)
  if s % bk:  # the last block starts at s - bk: keys before j * bk were counted already
    fresh_bk = jnp.minimum(start, s - bk) + jnp.arange(bk) >= start
    scores_BxKxGxWxbk = jnp.where(fresh_bk, scores_BxKxGxWxbk, -jnp.inf)
    keep_BxWxbk = fresh_bk if keep_BxWxbk is None else keep_BxWxbk & fresh_bk
  return k_BxbkxKxDh, v_BxbkxKxDh, scores_BxKxGxWxbk, keep_BxWxbk


def _forward(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, block_k):
  """(out [B, W, H, Dh], row max [B, K, G, W], row sum [B, K, G, W])."""
  q_BxWxKxGxDh, bk, blocks, scale = _layout(q_BxWxHxDh, k_BxSxKxDh, block_k)
  b, w, kv, g, dh = q_BxWxKxGxDh.shape

  def step(carry, j):
    acc_BxKxGxWxDh, max_BxKxGxW, sum_BxKxGxW = carry
    _, v_blk, scores_BxKxGxWxbk, _ = _block(q_BxWxKxGxDh, k_BxSxKxDh, v_BxSxKxDh, mask, j, bk,
                                            scale)
    new_max_BxKxGxW = jnp.maximum(max_BxKxGxW, scores_BxKxGxWxbk.max(axis=-1))
    rescale_BxKxGxW = jnp.exp(max_BxKxGxW - new_max_BxKxGxW)
    probs_BxKxGxWxbk = jnp.exp(scores_BxKxGxWxbk - new_max_BxKxGxW[..., None])
    sum_BxKxGxW = sum_BxKxGxW * rescale_BxKxGxW + probs_BxKxGxWxbk.sum(axis=-1)
    acc_BxKxGxWxDh = acc_BxKxGxWxDh * rescale_BxKxGxW[..., None] + jnp.einsum(
        "bkglm,bmkd->bkgld", probs_BxKxGxWxbk.astype(v_BxSxKxDh.dtype), v_blk,
        preferred_element_type=jnp.float32)
    return (acc_BxKxGxWxDh, new_max_BxKxGxW, sum_BxKxGxW), None

  init = (jnp.zeros((b, kv, g, w, dh), jnp.float32), jnp.full((b, kv, g, w), MASKED),
          jnp.zeros((b, kv, g, w), jnp.float32))
  (acc_BxKxGxWxDh, max_BxKxGxW, sum_BxKxGxW), _ = jax.lax.scan(step, init, jnp.arange(blocks))
  out_BxKxGxWxDh = acc_BxKxGxWxDh / sum_BxKxGxW[..., None]
  out_BxWxHxDh = jnp.einsum("bkgld->blkgd", out_BxKxGxWxDh).reshape(q_BxWxHxDh.shape)
  return out_BxWxHxDh.astype(q_BxWxHxDh.dtype), max_BxKxGxW, sum_BxKxGxW


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, block_k):
  return _forward(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, block_k)[0]


def _attention_fwd(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, block_k):
  out_BxWxHxDh, max_BxKxGxW, sum_BxKxGxW = _forward(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask,
                                                    block_k)
  return out_BxWxHxDh, (q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, out_BxWxHxDh, max_BxKxGxW,
                        sum_BxKxGxW)


def _attention_bwd(block_k, residuals, dout_BxWxHxDh):
  """FlashAttention-2's backward: per key block, p = exp(s - max) / sum, dV = p^T dO,
  dS = p (dO V^T - rowsum(dO O)) scale, dQ += dS K, dK = dS^T Q. The mask gets no gradient."""
  q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, out_BxWxHxDh, max_BxKxGxW, sum_BxKxGxW = residuals
  q_BxWxKxGxDh, bk, blocks, scale = _layout(q_BxWxHxDh, k_BxSxKxDh, block_k)
  dout_BxWxKxGxDh = dout_BxWxHxDh.reshape(q_BxWxKxGxDh.shape)
  delta_BxKxGxW = jnp.einsum("blkgd,blkgd->bkgl", dout_BxWxKxGxDh,
                             out_BxWxHxDh.reshape(q_BxWxKxGxDh.shape),
                             preferred_element_type=jnp.float32)

  def step(dq_BxWxKxGxDh, j):
    k_blk, v_blk, scores_BxKxGxWxbk, keep = _block(q_BxWxKxGxDh, k_BxSxKxDh, v_BxSxKxDh, mask, j,
                                                   bk, scale)
    probs_BxKxGxWxbk = (jnp.exp(scores_BxKxGxWxbk - max_BxKxGxW[..., None]) /
                        sum_BxKxGxW[..., None])
    dv_BxbkxKxDh = jnp.einsum("bkglm,blkgd->bmkd", probs_BxKxGxWxbk.astype(v_BxSxKxDh.dtype),
                              dout_BxWxKxGxDh, preferred_element_type=jnp.float32)
    dprobs_BxKxGxWxbk = jnp.einsum("blkgd,bmkd->bkglm", dout_BxWxKxGxDh, v_blk,
                                   preferred_element_type=jnp.float32)
    dscores_BxKxGxWxbk = probs_BxKxGxWxbk * (dprobs_BxKxGxWxbk - delta_BxKxGxW[..., None])
    if keep is not None:  # masked scores are constants in `attend`: no gradient through them
      dscores_BxKxGxWxbk = jnp.where(keep, dscores_BxKxGxWxbk, 0.0)
    dscores_BxKxGxWxbk = (dscores_BxKxGxWxbk * scale).astype(q_BxWxHxDh.dtype)
    dq_BxWxKxGxDh = dq_BxWxKxGxDh + jnp.einsum("bkglm,bmkd->blkgd", dscores_BxKxGxWxbk, k_blk,
                                               preferred_element_type=jnp.float32)
    dk_BxbkxKxDh = jnp.einsum("bkglm,blkgd->bmkd", dscores_BxKxGxWxbk, q_BxWxKxGxDh,
                              preferred_element_type=jnp.float32)
    return dq_BxWxKxGxDh, (dk_BxbkxKxDh.astype(k_BxSxKxDh.dtype),
                           dv_BxbkxKxDh.astype(v_BxSxKxDh.dtype))

  dq_BxWxKxGxDh, (dk_NxBxbkxKxDh, dv_NxBxbkxKxDh) = jax.lax.scan(
      step, jnp.zeros(q_BxWxKxGxDh.shape, jnp.float32), jnp.arange(blocks))

  def unblock(d_NxBxbkxKxDh):
    """[B, S, K, Dh] from the blocks; the shifted last block contributes only its fresh keys."""
    b, s = k_BxSxKxDh.shape[:2]
    d_BxNxbkxKxDh = jnp.moveaxis(d_NxBxbkxKxDh, 0, 1)
    d_BxSxKxDh = d_BxNxbkxKxDh[:, :-1].reshape(b, (blocks - 1) * bk, *k_BxSxKxDh.shape[2:])
    return jnp.concatenate([d_BxSxKxDh, d_BxNxbkxKxDh[:, -1, bk * blocks - s:]], axis=1)

  dmask = None if mask is None else jax.tree.map(lambda _: None, mask)
  return (dq_BxWxKxGxDh.reshape(q_BxWxHxDh.shape).astype(q_BxWxHxDh.dtype),
          unblock(dk_NxBxbkxKxDh), unblock(dv_NxBxbkxKxDh), dmask)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, *, block_k: int = 512):
  """softmax(q k^T / sqrt(Dh)) v over key blocks with an online softmax; returns [B, W, H, Dh] in
  q's dtype.

  Grouped-query: query head h uses kv head h // (H // K), without repeating K/V. `mask` is
  None, a boolean [B, W, S] or `Segments` (dcjax/model/masks.py). Memory is O(W * block_k)
  per head in the forward and backward; the numbers match `attend(q, k, v, masks.dense(mask))`.
  """
  return _attention(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, block_k)
