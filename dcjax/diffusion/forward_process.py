"""The masked-diffusion forward process and the training-time masks of docs/losses.md.

Everything random here is drawn from one step key for the whole global batch, so the
same key gives the same masks whether the batch is processed at once, in micro-batches,
or sharded over any mesh (JAX's partitionable threefry makes draws layout-invariant).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """The random parts of one training step (all static under jit)."""

  eps: float = 1e-3            # t ~ (1 - eps) U(0, 1) + eps
  anneal_steps: int = 0        # attention-mask annealing over N steps; 0 = always bidirectional
  truncate_prob: float = 0.0   # fraction of sequences cut to a random length (DiffuCoder: 0.01)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Noise:
  """Random draws for a [B, L] batch: per-sequence t, per-token u, truncation lengths,
  and the [L, L] annealing draws (uniforms compared with the step's ratio)."""

  t_B: jax.Array
  u_BxL: jax.Array
  length_B: jax.Array
  anneal_u_LxL: jax.Array | None


def draw_noise(key: jax.Array, batch: int, length: int, cfg: NoiseConfig) -> Noise:
  """All random draws of one step for a global [batch, length] batch."""
  k_t, k_u, k_sel, k_len, k_anneal = jax.random.split(key, 5)
  t_B = (1.0 - cfg.eps) * jax.random.uniform(k_t, (batch,), jnp.float32) + cfg.eps
  u_BxL = jax.random.uniform(k_u, (batch, length), jnp.float32)
  if cfg.truncate_prob > 0:
    cut_B = jax.random.uniform(k_sel, (batch,)) < cfg.truncate_prob
    random_len_B = jax.random.randint(k_len, (batch,), 1, length + 1)
    length_B = jnp.where(cut_B, random_len_B, length).astype(jnp.int32)
  else:
    length_B = jnp.full((batch,), length, jnp.int32)
  anneal_u_LxL = None
  if cfg.anneal_steps > 0:
    anneal_u_LxL = jax.random.uniform(k_anneal, (length, length), jnp.float32)
  return Noise(t_B, u_BxL, length_B, anneal_u_LxL)


def mask_tokens(tokens_BxL, maskable_BxL, t_B, u_BxL, mask_id: int):
  """Replaces each maskable token by `mask_id` with probability t: returns (noisy, masked)."""
  masked_BxL = maskable_BxL & (u_BxL < t_B[:, None])
  return jnp.where(masked_BxL, jnp.asarray(mask_id, tokens_BxL.dtype), tokens_BxL), masked_BxL


def anneal_ratio(step, anneal_steps: int):
  """min(1, (step + 1) / N): the probability that a non-causal key is visible."""
  return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / float(anneal_steps))


def annealed_attention_mask(anneal_u_LxL, ratio):
  """[L, L] mask: key j visible to query i iff j <= i or a Bernoulli(ratio) draw says so."""
  length = anneal_u_LxL.shape[0]
  causal_LxL = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  return causal_LxL | (anneal_u_LxL < ratio)


def truncation_keep(length_B, length: int):
  """[B, L] True for positions before each sequence's (possibly truncated) length."""
  return jnp.arange(length)[None, :] < length_B[:, None]


def document_attention_mask(segment_ids_BxL):
  """[B, L, L] True where query and key lie in the same packed document (segment 0 = pad)."""
  same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return same & (segment_ids_BxL[:, :, None] > 0)


def document_starts(segment_ids_BxL):
  """[B, L] True at the first token of every document after position 0."""
  starts = segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
  return jnp.concatenate([jnp.zeros_like(starts[:, :1]), starts], axis=1)
