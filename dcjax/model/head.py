"""The LM head applied to a sequence in chunks: per-token log-probabilities without ever holding
full-vocabulary fp32 logits for every position (docs/attention.md, "Chunked loss").

`token_logps` computes, chunk by chunk along the sequence, the same numbers as applying the
model's `lm_head` to all positions and taking an fp32 log-softmax: logits in the compute dtype,
then float32 statistics. Each chunk runs under `jax.checkpoint`, so the backward pass recomputes
one chunk's logits at a time instead of keeping them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from dcjax.model.config import ModelConfig
from dcjax.model.layers import matmul

ACT_LOGITS = ("activation_batch", "activation_length", "activation_vocab")


def chunk_size(length: int, chunk: int) -> int:
  """The largest divisor of `length` that is at most `chunk` (chunk <= 0: the whole length)."""
  if chunk <= 0 or chunk >= length:
    return length
  return max(d for d in range(1, chunk + 1) if length % d == 0)


def label_is_argmax(logits_BxCxV, labels_BxC, label_logit_BxC):
  """`argmax(logits, -1) == labels` (the first maximum wins ties) from two fused O(V)
  reductions: the label's logit reaches the row maximum and no earlier index reaches the
  label's logit. XLA:CPU runs `argmax`'s (value, index) reduction unvectorised, 8x slower
  than a max (docs/attention.md, "Chunked LM head"). Rows holding a NaN count as misses."""
  max_BxC = jnp.max(logits_BxCxV, axis=-1)
  index_BxCxV = jax.lax.broadcasted_iota(labels_BxC.dtype, logits_BxCxV.shape, 2)
  earlier_BxC = jnp.any((logits_BxCxV >= label_logit_BxC[..., None])
                        & (index_BxCxV < labels_BxC[..., None]), axis=-1)
  return (label_logit_BxC >= max_BxC) & ~earlier_BxC


def _chunk_stats(config: ModelConfig, hidden_BxCxD, kernel_DxV, labels_BxC, with_entropy):
  dtype = jnp.dtype(config.dtype)
  logits_BxCxV = matmul(hidden_BxCxD.astype(dtype), kernel_DxV.astype(dtype), 1)
  logits_BxCxV = nn.with_logical_constraint(logits_BxCxV, ACT_LOGITS).astype(jnp.float32)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  label_logit_BxC = jnp.take_along_axis(logits_BxCxV, labels_BxC[..., None], axis=-1)[..., 0]
  out = dict(logp=label_logit_BxC - lse_BxC,
             hit=label_is_argmax(logits_BxCxV, labels_BxC, label_logit_BxC))
  if with_entropy:
    probs = jax.nn.softmax(logits_BxCxV, axis=-1)
    out["entropy"] = lse_BxC - jnp.sum(probs * logits_BxCxV, axis=-1)
  return out


def token_logps(config: ModelConfig, params, hidden_BxMxD, labels_BxM, *,
                with_entropy: bool = False) -> dict:
  """{"logp": [B, M] fp32 log p(label), "hit": [B, M] argmax == label, "entropy": [B, M]
  (with_entropy)} for the final-norm hidden states `hidden_BxMxD` (the model with head=False),
  in chunks of `config.logits_chunk` positions."""
  kernel_DxV = params["lm_head"]["kernel"]
  b, m, d = hidden_BxMxD.shape
  c = chunk_size(m, config.logits_chunk)
  if c == m:
    return _chunk_stats(config, hidden_BxMxD, kernel_DxV, labels_BxM, with_entropy)
  hidden_NxBxCxD = jnp.moveaxis(hidden_BxMxD.reshape(b, m // c, c, d), 1, 0)
  labels_NxBxC = jnp.moveaxis(labels_BxM.reshape(b, m // c, c), 1, 0)
  body = jax.checkpoint(
      lambda h, y: _chunk_stats(config, h, kernel_DxV, y, with_entropy),
      policy=jax.checkpoint_policies.nothing_saveable)
  stats = jax.lax.map(lambda xs: body(*xs), (hidden_NxBxCxD, labels_NxBxC))
  return {k: jnp.moveaxis(v, 0, 1).reshape(b, m) for k, v in stats.items()}
