"""Attention masks as the kernels take them: dense booleans, or segment ids.

A mask is one of
  * None: every query sees every key;
  * a boolean array [B, W, S]: query i may attend key j iff mask[b, i, j] (any pattern, e.g.
    the adaptation stage's annealed mask);
  * `Segments(q [B, W], kv [B, S])`: query i may attend key j iff q[b, i] == kv[b, j]. This
    covers left padding (pads get segment 0, real tokens 1) and packed documents (document
    index + 1), and is what the splash kernel takes (docs/attention.md).

Rows whose keys are all masked (dense masks only) get a uniform distribution over every key,
as the plain attention gives them; with segments a pad query sees the other pads. Either way
no real token attends a pad, so real tokens' outputs agree across the kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Segments(NamedTuple):
  """Segment ids of the queries [B, W] and of the keys [B, S] (int32)."""

  q: jax.Array
  kv: jax.Array


def dense(mask) -> jax.Array | None:
  """The boolean [B, W, S] form of any mask (None stays None)."""
  if isinstance(mask, Segments):
    return mask.q[:, :, None] == mask.kv[:, None, :]
  return mask


def keep_segments(keep_BxL, document_BxL=None) -> Segments:
  """Segments for a [B, L] keep-mask (1 = real token), optionally split into documents
  (`document_BxL`: a positive id per real token, equal within a document, as the data
  pipeline's segment_ids): pads 0, real tokens their document id (or 1)."""
  keep = keep_BxL.astype(bool)
  ids = jnp.ones(keep.shape, jnp.int32) if document_BxL is None else document_BxL.astype(jnp.int32)
  seg_BxL = jnp.where(keep, ids, 0)
  return Segments(seg_BxL, seg_BxL)
