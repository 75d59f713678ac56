"""The Dream / DiffuCoder decoder: Qwen2 blocks with bidirectional attention, scanned over layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.model.attention import Attention
from dcjax.model.config import ModelConfig
from dcjax.model.layers import MLP, Dense, Embed, RMSNorm
from dcjax.model.rope import rope_cos_sin

ACT_BxLxD = ("activation_batch", "activation_length", "activation_embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
  """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, cos_BxLxDh, sin_BxLxDh, mask_BxLxL):
    c = self.config
    h = RMSNorm(c, name="input_layernorm")(x_BxLxD)
    x_BxLxD = x_BxLxD + Attention(c, name="self_attn")(h, cos_BxLxDh, sin_BxLxDh, mask_BxLxL)
    h = RMSNorm(c, name="post_attention_layernorm")(x_BxLxD)
    x_BxLxD = x_BxLxD + MLP(c, name="mlp")(h)
    return nn.with_logical_constraint(x_BxLxD, ACT_BxLxD), None


class Transformer(nn.Module):
  """tokens [B, L] -> unshifted logits [B, L, V] (position i-1 predicts token i)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL, mask_BxLxL):
    c = self.config
    x_BxLxD = nn.with_logical_constraint(Embed(c, name="embed_tokens")(tokens_BxL), ACT_BxLxD)
    cos_BxLxDh, sin_BxLxDh = rope_cos_sin(positions_BxL, c.head_dim, c.rope_theta)

    layer = DecoderLayer
    if c.remat_policy != "none":
      layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
    stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x_BxLxD, _ = stack(c, name="layers")(x_BxLxD, cos_BxLxDh, sin_BxLxDh, mask_BxLxL)

    x_BxLxD = RMSNorm(c, name="norm")(x_BxLxD)
    logits_BxLxV = Dense(c, (c.vocab_size,), ("embed", "vocab"), name="lm_head")(x_BxLxD)
    return nn.with_logical_constraint(
        logits_BxLxV, ("activation_batch", "activation_length", "activation_vocab"))


def mask_and_positions(tokens_BxL, attention_mask=None, positions=None):
  """Turns the user-facing mask into a [B, L, L] boolean mask and default positions.

  * None: every token sees every token; positions 0..L-1.
  * [B, L] keep-mask (1 = real token, left padding): pair mask = outer product of the
    row's keep-mask; positions = cumsum(keep) - 1 with pads at position 1 (Dream's rule).
  * [B, L, L] mask: used as is (True/1 = query i may attend key j); positions 0..L-1.
  """
  b, l = tokens_BxL.shape
  if attention_mask is None:
    mask_BxLxL = None
    default_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  else:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape == (b, l):
      keep_BxL = attention_mask.astype(bool)
      mask_BxLxL = keep_BxL[:, :, None] & keep_BxL[:, None, :]
      default_BxL = jnp.where(keep_BxL, jnp.cumsum(keep_BxL, axis=-1, dtype=jnp.int32) - 1, 1)
    elif attention_mask.shape == (b, l, l):
      mask_BxLxL = attention_mask.astype(bool)
      default_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
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
