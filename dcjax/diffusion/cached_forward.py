"""The model forward as a pure function that also returns and accepts per-layer keys/values.

Same parameter pytree and the same building blocks as `dcjax.model` (the Dense, RMSNorm,
MLP and Embed modules applied to their own sub-trees, `apply_rope`, `attend`), so with
nothing cached it computes exactly `dcjax.model.apply` (tested). Two extras the sampler
needs:

* `forward_full` returns the final-norm hidden states and every layer's K/V for the whole
  canvas (a block cache refresh), and the sampler applies the LM head only to the
  positions it reads (saves the [B, L, V] logits of the rest).
* `forward_window` runs only a window of query positions `[start, start + W)`: each layer
  attends to the cached K/V of the whole canvas with the window's entries replaced by
  freshly computed ones (Fast-dLLM's prefix / dual block cache).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.model.attention import attend
from dcjax.model.config import ModelConfig
from dcjax.model.layers import MLP, Dense, Embed, RMSNorm
from dcjax.model.rope import apply_rope, rope_cos_sin
from dcjax.parallel.rules import LOGICAL_AXIS_RULES

ACT_BxLxD = ("activation_batch", "activation_length", "activation_embed")
ACT_KV = ("activation_batch", "activation_length", "activation_kv_heads", "head_dim")
ACT_Q = ("activation_batch", "activation_length", "activation_heads", "head_dim")


class KVCache(NamedTuple):
  """Per-layer keys and values after RoPE: each [NL, B, L, K, Dh] in the compute dtype."""

  k: jax.Array
  v: jax.Array


def _embed(c: ModelConfig, params, tokens_BxW):
  return nn.with_logical_constraint(
      Embed(c).apply({"params": params["embed_tokens"]}, tokens_BxW), ACT_BxLxD)


def _proj(c: ModelConfig, p, x, heads: int, axes):
  return Dense(c, (heads, c.head_dim), ("embed",) + axes, bias_axes=axes).apply(
      {"params": p}, x)


def _attention(c: ModelConfig, q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxWxS):
  if c.attention_impl == "dot_product_attention":
    return jax.nn.dot_product_attention(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh,
                                        mask=mask_BxWxS[:, None])
  return attend(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxWxS)


def _layers(c: ModelConfig, params, x_BxWxD, positions_BxW, mask_BxWxS, cache: KVCache | None,
            start, collect_kv: bool):
  """The scanned decoder blocks; returns (x, fresh K/V of the W positions per layer, or None)."""
  cos, sin = rope_cos_sin(positions_BxW, c.head_dim, c.rope_theta)

  def block(x, xs):
    p, cached = xs
    h = RMSNorm(c).apply({"params": p["input_layernorm"]}, x)
    a = p["self_attn"]
    q = nn.with_logical_constraint(
        apply_rope(_proj(c, a["q_proj"], h, c.num_heads, ("heads", "head_dim")), cos, sin),
        ACT_Q)
    k = nn.with_logical_constraint(
        apply_rope(_proj(c, a["k_proj"], h, c.num_kv_heads, ("kv_heads", "head_dim")), cos,
                   sin), ACT_KV)
    v = nn.with_logical_constraint(
        _proj(c, a["v_proj"], h, c.num_kv_heads, ("kv_heads", "head_dim")), ACT_KV)
    if cached is None:
      k_all, v_all = k, v
    else:
      k_all = jax.lax.dynamic_update_slice_in_dim(cached[0], k.astype(cached[0].dtype), start, 1)
      v_all = jax.lax.dynamic_update_slice_in_dim(cached[1], v.astype(cached[1].dtype), start, 1)
    out = _attention(c, q, k_all, v_all, mask_BxWxS)
    x = x + Dense(c, (c.hidden_size,), ("heads", "head_dim", "embed"), contract=2).apply(
        {"params": a["o_proj"]}, out)
    h = RMSNorm(c).apply({"params": p["post_attention_layernorm"]}, x)
    x = x + MLP(c).apply({"params": p["mlp"]}, h)
    return nn.with_logical_constraint(x, ACT_BxLxD), (k, v) if collect_kv else None

  xs = (params["layers"], None if cache is None else (cache.k, cache.v))
  x, kv = jax.lax.scan(block, x_BxWxD, xs)
  return x, (KVCache(*kv) if collect_kv else None)


def pair_mask(keep_q_BxW, keep_k_BxS):
  """Query i may attend key j iff both are real tokens (outer product of the keep-masks)."""
  return keep_q_BxW.astype(bool)[:, :, None] & keep_k_BxS.astype(bool)[:, None, :]


def forward_full(config: ModelConfig, params, tokens_BxL, positions_BxL, keep_BxL,
                 rules=LOGICAL_AXIS_RULES, collect_kv: bool = True):
  """All positions: (final-norm hidden [B, L, D], KVCache of every layer or None)."""
  with nn.logical_axis_rules(rules):
    x = _embed(config, params, tokens_BxL)
    x, kv = _layers(config, params, x, positions_BxL, pair_mask(keep_BxL, keep_BxL), None, None,
                    collect_kv)
    return RMSNorm(config).apply({"params": params["norm"]}, x), kv


def forward_window(config: ModelConfig, params, tokens_BxW, positions_BxW, keep_BxW, keep_BxL,
                   cache: KVCache, start, rules=LOGICAL_AXIS_RULES):
  """Queries at canvas positions [start, start + W) only: final-norm hidden [B, W, D].

  Keys/values are `cache` (whole canvas, length L) with the window's entries replaced by
  fresh ones computed from `tokens_BxW`; `start` may be traced.
  """
  with nn.logical_axis_rules(rules):
    x = _embed(config, params, tokens_BxW)
    x, _ = _layers(config, params, x, positions_BxW, pair_mask(keep_BxW, keep_BxL), cache,
                   start, collect_kv=False)
    return RMSNorm(config).apply({"params": params["norm"]}, x)


def lm_head(config: ModelConfig, params, h_BxWxD, rules=LOGICAL_AXIS_RULES):
  """Hidden states -> logits [B, W, V] in the compute dtype."""
  with nn.logical_axis_rules(rules):
    logits = Dense(config, (config.vocab_size,), ("embed", "vocab")).apply(
        {"params": params["lm_head"]}, h_BxWxD)
    return nn.with_logical_constraint(
        logits, ("activation_batch", "activation_length", "activation_vocab"))


def logits_full(config: ModelConfig, params, tokens_BxL, keep_BxL=None):
  """Unshifted logits of the whole canvas with SPEC §1 positions: equals `dcjax.model.apply`
  with a [B, L] keep-mask."""
  if keep_BxL is None:
    keep_BxL = jnp.ones(tokens_BxL.shape, bool)
  h, _ = forward_full(config, params, tokens_BxL, keep_positions(keep_BxL), keep_BxL,
                      collect_kv=False)
  return lm_head(config, params, h)


def keep_positions(keep_BxL):
  """Dream's position ids for left padding: cumsum(keep) - 1, pads at 1."""
  keep = keep_BxL.astype(bool)
  return jnp.where(keep, jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1, 1)
