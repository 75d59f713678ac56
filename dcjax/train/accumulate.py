"""Micro-batching shared by the train step and the RL learner.

`split_micro` lays a global batch out as k micro-batches that each span every batch shard
(row j goes to micro-batch j mod k, so no device idles); `accumulate` sums a per-micro-batch
(gradients, sums) function over them with one `lax.scan`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def split_micro(x, k: int):
  """[B, ...] -> [k, B/k, ...]; micro-batch j holds rows j, j+k, ..."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)


def merge_micro(x):
  """Inverse of `split_micro`: [k, B/k, ...] -> [B, ...]."""
  k, m = x.shape[:2]
  return jnp.swapaxes(x, 0, 1).reshape((k * m,) + x.shape[2:])


def accumulate(grad_fn: Callable, params, batch, k: int):
  """Sum over k micro-batches of `grad_fn(params, micro) -> (grads, sums)`.

  With k = 1 it is `grad_fn(params, batch)`. The caller decides the normalisation: the train
  step divides its loss by a global-batch normaliser up front (so the sum is the big-batch
  gradient), the learner divides by k (a mean of per-micro-batch token means).
  """
  if k == 1:
    return grad_fn(params, batch)
  stacked = jax.tree.map(lambda x: split_micro(x, k), batch)
  grads_shape, sums_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], stacked))
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

  def body(carry, micro):
    grads, sums = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  (grads, sums), _ = jax.lax.scan(body, (zeros(grads_shape), zeros(sums_shape)), stacked)
  return grads, sums
