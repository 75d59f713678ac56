"""The Dream / DiffuCoder decoder: Qwen2 blocks with bidirectional attention, scanned over layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.model import masks
from dcjax.model.attention import Attention, KVCache
from dcjax.model.config import REMAT_POLICIES, ModelConfig
from dcjax.model.layers import MLP, Dense, Embed, RMSNorm
from dcjax.model.rope import rope_cos_sin
from dcjax.model.wanted import tail_on_wanted

ACT_BxLxD = ("activation_batch", "activation_length", "activation_embed")


class DecoderLayer(nn.Module):
  """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h)). Returns (h, this layer's
  K/V when `collect_kv`, else None). With `query_rows=(start, length)` only those rows are
  computed past the keys and values: h is [B, length, D]. With `wanted_BxW` (boolean, over
  the W rows, or the `query_rows` when given) the tail after attention (residual,
  post-attention norm, MLP) runs on the wanted rows only, and the others come back as zeros
  (`dcjax.model.wanted`)."""

  config: ModelConfig
  collect_kv: bool = False

  @nn.compact
  def __call__(self, x_BxWxD, cos_BxWxDh, sin_BxWxDh, mask_BxWxS, cache, cache_start,
               query_rows=None, wanted_BxW=None):
    c = self.config
    h = RMSNorm(c, name="input_layernorm")(x_BxWxD)
    cache, attn_BxWxD = Attention(c, name="self_attn")(h, cos_BxWxDh, sin_BxWxDh, mask_BxWxS,
                                                       cache, cache_start, query_rows)
    if query_rows is not None:
      x_BxWxD = x_BxWxD[:, query_rows[0]:query_rows[0] + query_rows[1]]
    if wanted_BxW is not None and not self.is_initializing():
      params = self.variables["params"]
      tail_params = {k: params[k] for k in ("post_attention_layernorm", "mlp")}
      x_BxWxD = tail_on_wanted(c, tail_params, x_BxWxD, attn_BxWxD, wanted_BxW)
      return nn.with_logical_constraint(x_BxWxD, ACT_BxLxD), cache if self.collect_kv else None
    x_BxWxD = x_BxWxD + attn_BxWxD
    h = RMSNorm(c, name="post_attention_layernorm")(x_BxWxD)
    x_BxWxD = x_BxWxD + MLP(c, name="mlp")(h)
    return nn.with_logical_constraint(x_BxWxD, ACT_BxLxD), cache if self.collect_kv else None


class Transformer(nn.Module):
  """tokens [B, W] -> (KV cache or None, unshifted logits); position i-1 predicts token i.

  Without a cache, the W tokens attend to each other under `mask_BxWxS` (S = W). With a
  `cache` (every layer's K/V of a canvas of S positions, stacked [NL, B, S, K, Dh]), the W
  tokens are the canvas positions [cache_start, cache_start + W) and attend to the whole
  canvas, their fresh K/V replacing the cached ones (docs/model.md, "KV cache"). With
  `collect_kv`, the K/V used by every layer are returned as the new cache. `logits_length`
  (static) applies the LM head only to positions [logits_start, logits_start + length) of
  the W: the sampler reads one block, not the whole canvas. With `head=False` the final-norm
  hidden states [B, W, D] come back instead of logits (for `model.head.token_logps`).
  `last_layer_rows` (static, with a static `logits_start` and the layer loop,
  `scan_layers=False`): the last layer computes only the rows the head reads past its keys
  and values (docs/model.md, "Rows the head reads"). `wanted` ([B, W] boolean, or
  [B, logits_length] with a window; with `head=False`): the states of the other positions
  come back as zeros, and with the layer loop the last layer's tail skips them.
  """

  config: ModelConfig
  collect_kv: bool = False
  head: bool = True

  @nn.compact
  def __call__(self, tokens_BxW, positions_BxW, mask_BxWxS, cache: KVCache | None = None,
               cache_start=0, logits_start=0, logits_length: int | None = None,
               last_layer_rows: bool = False, wanted=None):
    c = self.config
    window = None
    if last_layer_rows and logits_length is not None and not c.scan_layers:
      window = (int(logits_start), logits_length)
    if wanted is not None and self.head:
      raise ValueError("`wanted` selects hidden states: it needs head=False")
    x_BxWxD = nn.with_logical_constraint(Embed(c, name="embed_tokens")(tokens_BxW), ACT_BxLxD)
    cos_BxWxDh, sin_BxWxDh = rope_cos_sin(positions_BxW, c.head_dim, c.rope_theta)

    layer = DecoderLayer
    if c.remat_policy != "none":
      policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[c.remat_policy])
      layer = nn.remat(DecoderLayer, policy=policy, prevent_cse=False)
    if c.scan_layers or self.is_initializing():
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                      length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxWxD, new_cache = stack(c, self.collect_kv, name="layers")(
          x_BxWxD, cos_BxWxDh, sin_BxWxDh, mask_BxWxS, cache, cache_start)
    else:
      x_BxWxD, new_cache = unrolled_layers(
          c, self.collect_kv, self.variables["params"]["layers"], x_BxWxD, cos_BxWxDh,
          sin_BxWxDh, mask_BxWxS, cache, cache_start, window, wanted)

    x_BxWxD = RMSNorm(c, name="norm")(x_BxWxD)
    if logits_length is not None and window is None:
      x_BxWxD = jax.lax.dynamic_slice_in_dim(x_BxWxD, logits_start, logits_length, axis=1)
    if not self.head:  # lm_head's parameters are unused (apply ignores them)
      if wanted is not None:  # zeros elsewhere, whichever path computed the states
        x_BxWxD = jnp.where(wanted[..., None], x_BxWxD, jnp.zeros((), x_BxWxD.dtype))
      return new_cache, x_BxWxD
    logits_BxWxV = Dense(c, (c.vocab_size,), ("embed", "vocab"), name="lm_head")(x_BxWxD)
    return new_cache, nn.with_logical_constraint(
        logits_BxWxV, ("activation_batch", "activation_length", "activation_vocab"))


def _unstack(tree, n: int) -> list:
  """n trees, the i-th holding slice i of every leaf's leading axis. One `lax.split` per
  leaf, whose transpose is one concatenate: the per-layer gradients land in the stacked
  gradient without a zero-filled buffer."""
  parts = jax.tree.map(lambda a: jax.lax.split(a, [1] * n, axis=0), tree)
  return [jax.tree.map(lambda a, i=i: a[i][0], parts, is_leaf=lambda x: isinstance(x, list))
          for i in range(n)]


def unrolled_layers(config: ModelConfig, collect_kv: bool, stacked_params, x_BxWxD,
                    cos_BxWxDh, sin_BxWxDh, mask_BxWxS, cache, cache_start, last_rows=None,
                    last_wanted=None):
  """The layer stack as a Python loop over the scanned [NL, ...] parameters
  (`scan_layers=False`): the same layer, the same parameters, no loop carry and no stacked
  residuals (docs/model.md, "Layers"). `last_rows=(start, length)`: the last layer computes
  only those rows (`DecoderLayer`'s `query_rows`); `last_wanted`: its tail only the wanted
  rows (`DecoderLayer`'s `wanted_BxW`)."""
  def layer(params, x, layer_cache, rows=None, wanted=None):
    return DecoderLayer(config, collect_kv).apply(
        {"params": params}, x, cos_BxWxDh, sin_BxWxDh, mask_BxWxS, layer_cache, cache_start,
        rows, wanted)

  if config.remat_policy != "none":
    layer = jax.checkpoint(layer, prevent_cse=False, static_argnums=(3,), policy=getattr(
        jax.checkpoint_policies, REMAT_POLICIES[config.remat_policy]))
  n = config.num_layers
  caches = [None] * n if cache is None else _unstack(cache, n)
  kvs = []
  for i, (params, layer_cache) in enumerate(zip(_unstack(stacked_params, n), caches)):
    last = i == n - 1
    x_BxWxD, kv = layer(params, x_BxWxD, layer_cache, last_rows if last else None,
                        last_wanted if last else None)
    kvs.append(kv)
  new_cache = None if kvs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs)
  return x_BxWxD, new_cache


def keep_positions(keep_BxL):
  """Dream's position ids for left-padded rows: cumsum(keep) - 1, pads at position 1."""
  keep = keep_BxL.astype(bool)
  return jnp.where(keep, jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1, 1)


def pair_mask(keep_q_BxW, keep_k_BxS):
  """Query i may attend key j iff both are real tokens (outer product of the keep-masks)."""
  return keep_q_BxW.astype(bool)[:, :, None] & keep_k_BxS.astype(bool)[:, None, :]


def mask_and_positions(tokens_BxL, attention_mask=None, positions=None):
  """Turns the user-facing mask into a kernel mask (dcjax/model/masks.py) and default positions.

  * None: every token sees every token; positions 0..L-1.
  * [B, L] keep-mask (1 = real token, left padding): segments (real tokens 1, pads 0), so
    real tokens see real tokens only; positions = cumsum(keep) - 1 with pads at position 1
    (Dream's rule).
  * `masks.Segments`: used as is; positions 0..L-1.
  * [B, L, L] mask: used as is (True/1 = query i may attend key j); positions 0..L-1.
  """
  b, l = tokens_BxL.shape
  arange_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  if attention_mask is None:
    mask_BxLxL = None
    default_BxL = arange_BxL
  elif isinstance(attention_mask, masks.Segments):
    mask_BxLxL, default_BxL = attention_mask, arange_BxL
  else:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape == (b, l):
      mask_BxLxL = masks.keep_segments(attention_mask)
      default_BxL = keep_positions(attention_mask)
    elif attention_mask.shape == (b, l, l):
      mask_BxLxL = attention_mask.astype(bool)
      default_BxL = arange_BxL
    else:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected [B, L] = "
                       f"{(b, l)} (keep-mask) or [B, L, L] = {(b, l, l)}")
  if positions is None:
    positions_BxL = default_BxL
  else:
    positions_BxL = jnp.asarray(positions)
    if positions_BxL.shape != (b, l):
      raise ValueError(f"positions has shape {positions_BxL.shape}; expected [B, L] = {(b, l)}")
  return mask_BxLxL, positions_BxL
