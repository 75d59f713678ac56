"""Splash attention: the Pallas TPU flash-attention kernel behind dcjax's attention interface.

Wraps `jax.experimental.pallas.ops.tpu.splash_attention` (docs/attention.md). Semantics are
those of `attend(q, k, v, masks.dense(segments))`: softmax(q k^T * Dh**-0.5) v, bidirectional
(a `FullMask`), with `masks.Segments` restricting each query to keys of its own segment.

  * Scaling: splash does not scale the logits; q is multiplied by Dh**-0.5 (in q's dtype)
    before the kernel.
  * Grouped-query attention: the installed splash MHA kernel takes K kv heads for H query
    heads (H % K == 0) and maps query head h to kv head h // (H // K) in its index maps, so
    K/V are passed as they are; no head is repeated.
  * Layout: the kernel takes one example's [heads, L, Dh]; the batch is vmapped.
  * Blocks: `block_q`/`block_kv` serve the forward, dq and dkv kernels alike, each clipped to
    the largest multiple of 128 not above it that divides W (S). W and S must be multiples of
    128, in interpret mode too: the kernel's own code (not Mosaic) rejects block_kv % 128 != 0
    in the forward and, with segment ids, block_q % 128 != 0 in the dkv backward (only W
    without segments could be smaller there; not worth a special case). Tests use L=128, 256.
  * Sharding: under `jax.set_mesh(mesh)` the kernel runs per shard in `jax.shard_map`, the
    batch over the mesh axes of `activation_batch` and the heads over those of
    `activation_heads` / `activation_kv_heads` (dcjax.parallel.rules; axes of size 1 are
    dropped), segment ids over the batch only. The tensor axes must divide H and K.
  * A segment id of a query must occur among the key ids (true for self-attention, where
    q and kv ids are the same array); splash has no all-masked-row fallback.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from dcjax.model import masks
from dcjax.parallel.rules import LOGICAL_AXIS_RULES

LANES = 128  # splash's block_q and block_kv must be multiples of the TPU lane width
ACT_Q = ("activation_batch", "activation_length", "activation_heads", "head_dim")
ACT_KV = ("activation_batch", "activation_length", "activation_kv_heads", "head_dim")
ACT_SEG = ("activation_batch", "activation_length")


def _block(length: int, block: int, name: str) -> int:
  """The largest multiple of 128 that is <= block (at least 128) and divides `length`."""
  if length % LANES:
    raise ValueError(f"splash_attention: {name}={length} must be a multiple of {LANES} (the "
                     f"kernel's block sizes are multiples of {LANES}, in interpret mode too); "
                     "use attention_impl='blockwise' for other lengths")
  size = max(LANES, min(block, length) // LANES * LANES)
  while length % size:
    size -= LANES
  return size


def _kernel(heads: int, w: int, s: int, block_q: int, block_kv: int, interpret: bool):
  bq, bkv = _block(w, block_q, "query length W"), _block(s, block_kv, "key length S")
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                            block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                            block_q_dq=bq, block_kv_dq=bkv)
  mask = splash_mask.MultiHeadMask([splash_mask.FullMask((w, s))] * heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _local(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments, *, interpret, block_q, block_kv):
  """The kernel on (one shard of) the batch: [B, W, H, Dh] -> [B, W, H, Dh]."""
  _, w, h, dh = q_BxWxHxDh.shape
  kernel = _kernel(h, w, k_BxSxKxDh.shape[1], block_q, block_kv, interpret)
  q_BxHxWxDh = (q_BxWxHxDh * dh ** -0.5).astype(q_BxWxHxDh.dtype).transpose(0, 2, 1, 3)
  k_BxKxSxDh, v_BxKxSxDh = k_BxSxKxDh.transpose(0, 2, 1, 3), v_BxSxKxDh.transpose(0, 2, 1, 3)
  if segments is None:
    out_BxHxWxDh = jax.vmap(kernel)(q_BxHxWxDh, k_BxKxSxDh, v_BxKxSxDh)
  else:
    ids = splash.SegmentIds(q=segments.q.astype(jnp.int32), kv=segments.kv.astype(jnp.int32))
    out_BxHxWxDh = jax.vmap(kernel)(q_BxHxWxDh, k_BxKxSxDh, v_BxKxSxDh, ids)
  return out_BxHxWxDh.transpose(0, 2, 1, 3)


def _spec(mesh, logical) -> P:
  """The mesh axes of `logical` under dcjax's rules, without axes of size 1 or absent."""
  def keep(entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    names = tuple(n for n in names if n is not None and mesh.shape.get(n, 1) > 1)
    return names[0] if len(names) == 1 else (names or None)
  return P(*(keep(entry) for entry in nn.logical_to_mesh_axes(logical, LOGICAL_AXIS_RULES)))


def _size(mesh, entry) -> int:
  names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def splash_attention(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments, *, interpret: bool = False,
                     block_q: int = 512, block_kv: int = 512):
  """Bidirectional splash attention (jax.experimental.pallas.ops.tpu.splash_attention); returns
  [B, W, H, Dh] in q's dtype.

  `segments`: None (every query sees every key) or `masks.Segments(q [B, W], kv [B, S])`.
  `interpret=True` runs the Pallas interpreter (CPU tests). See the module docstring and
  docs/attention.md for the block-size rules, GQA and sharding.
  """
  if segments is not None and not isinstance(segments, masks.Segments):
    raise TypeError(f"splash_attention takes None or masks.Segments, got {type(segments)}")
  h, kv = q_BxWxHxDh.shape[2], k_BxSxKxDh.shape[2]
  if h % kv:
    raise ValueError(f"splash_attention: {kv} kv heads must divide {h} query heads")
  local = lambda q, k, v, *seg: _local(q, k, v, masks.Segments(*seg) if seg else None,
                                       interpret=interpret, block_q=block_q, block_kv=block_kv)
  seg_args = () if segments is None else tuple(segments)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, *seg_args)
  q_spec, kv_spec, seg_spec = _spec(mesh, ACT_Q), _spec(mesh, ACT_KV), _spec(mesh, ACT_SEG)
  tensor = _size(mesh, kv_spec[2])
  if h % _size(mesh, q_spec[2]) or kv % tensor:
    raise ValueError(f"splash_attention: the head mesh axes ({tensor} devices) must divide the "
                     f"{h} query heads and the {kv} kv heads")
  in_specs = (q_spec, kv_spec, kv_spec) + (seg_spec,) * len(seg_args)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                       check_vma=False)(q_BxWxHxDh, k_BxSxKxDh, v_BxSxKxDh, *seg_args)
