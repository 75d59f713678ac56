"""The LM head applied to a sequence in chunks: per-token log-probabilities without ever holding
full-vocabulary fp32 logits for every position (docs/attention.md, "Chunked loss").

`token_logps` computes, chunk by chunk along the sequence, the same numbers as applying the
model's `lm_head` to all positions and taking an fp32 log-softmax: logits in the compute dtype,
then float32 statistics. Each chunk runs under `jax.checkpoint`, so the backward pass recomputes
one chunk's logits at a time instead of keeping them all.

With `where`, only the positions the caller reads are scored: each batch shard's positions
are sorted so that the wanted ones come first, and chunks past the last wanted position are
skipped; without remat (`remat_policy="none"`) the wanted rows go through one matmul, cut at
one of a few static sizes, and the logits are kept for the backward (docs/attention.md,
"Scoring only the targets").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from dcjax.model.config import ModelConfig
from dcjax.model.layers import matmul
from dcjax.parallel.rules import LOGICAL_AXIS_RULES

ACT_LOGITS = ("activation_batch", "activation_length", "activation_vocab")
BATCH_MESH_AXES = dict(LOGICAL_AXIS_RULES)["activation_batch"]


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


def expectation(probs_BxCxV, values_BxCxV):
  """sum_v p_v x_v per row, as a batched dot: XLA:CPU runs the elementwise product + row sum
  as a reduction 6x slower ([128, 16384]: 7.2 against 1.2 ms)."""
  return jnp.einsum("...v,...v->...", probs_BxCxV, values_BxCxV,
                    precision=jax.lax.Precision.HIGHEST)


def _chunk_stats(config: ModelConfig, hidden_BxCxD, kernel_DxV, labels_BxC, with_entropy,
                 with_logits: bool = False):
  """The chunk's statistics; with `with_logits`, its float32 logits under "logits" too."""
  dtype = jnp.dtype(config.dtype)
  logits_BxCxV = matmul(hidden_BxCxD.astype(dtype), kernel_DxV.astype(dtype), 1)
  logits_BxCxV = nn.with_logical_constraint(logits_BxCxV, ACT_LOGITS).astype(jnp.float32)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  label_logit_BxC = jnp.take_along_axis(logits_BxCxV, labels_BxC[..., None], axis=-1)[..., 0]
  out = dict(logp=label_logit_BxC - lse_BxC,
             hit=label_is_argmax(logits_BxCxV, labels_BxC, label_logit_BxC))
  if with_entropy:
    probs = jax.nn.softmax(logits_BxCxV, axis=-1)
    out["entropy"] = lse_BxC - expectation(probs, logits_BxCxV)
  if with_logits:
    out["logits"] = logits_BxCxV
  return out


def token_logps(config: ModelConfig, params, hidden_BxMxD, labels_BxM, *,
                with_entropy: bool = False, where=None) -> dict:
  """{"logp": [B, M] fp32 log p(label), "hit": [B, M] argmax == label, "entropy": [B, M]
  (with_entropy)} for the final-norm hidden states `hidden_BxMxD` (the model with head=False),
  in chunks of `config.logits_chunk` positions.

  `where` ([B, M] bool, optional): the positions the caller reads. Elsewhere the outputs are
  0 (False for "hit") with no gradient, and the LM head skips them (`_wanted_stats`).
  """
  if where is not None:
    return _wanted_stats(config, params["lm_head"]["kernel"], hidden_BxMxD, labels_BxM,
                         where, with_entropy)
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


def batch_groups(batch: int) -> int:
  """Into how many groups of rows the current mesh (`jax.set_mesh`) splits a batch of
  `batch` rows: the product of the mesh axes that `activation_batch` maps to, or 1 outside a
  mesh. Sorting positions within a group keeps every row on the shard that holds it."""
  shape = jax.sharding.get_abstract_mesh().shape
  axes = BATCH_MESH_AXES if isinstance(BATCH_MESH_AXES, tuple) else (BATCH_MESH_AXES,)
  return math.gcd(batch, math.prod(shape.get(axis, 1) for axis in axes))


@jax.custom_vjp
def permute(x_GxNx, order_GxN, inverse_GxN):
  """x[g, order[g, i]] along axis 1, for a permutation `order` whose inverse is `inverse`:
  the transpose is the gather by `inverse`, not a scatter-add."""
  return _gather(x_GxNx, order_GxN)


def _gather(x_GxNx, index_GxN):
  index = index_GxN.reshape(index_GxN.shape + (1,) * (x_GxNx.ndim - 2))
  return jnp.take_along_axis(x_GxNx, index, axis=1)


def _permute_fwd(x_GxNx, order_GxN, inverse_GxN):
  return _gather(x_GxNx, order_GxN), (order_GxN, inverse_GxN)


def _permute_bwd(residuals, g_GxNx):
  order_GxN, inverse_GxN = residuals
  return _gather(g_GxNx, inverse_GxN), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


def _wanted_stats(config: ModelConfig, kernel_DxV, hidden_BxMxD, labels_BxM, where_BxM,
                  with_entropy: bool) -> dict:
  """`token_logps` at the `where` positions only (docs/attention.md, "Scoring only the
  targets"). The B rows form G groups, one per batch shard (`batch_groups`); within each
  group the N = B/G * M positions are sorted wanted-first (a stable sort), and the LM head
  runs over chunks of `logits_chunk` sorted positions, skipping (`lax.cond`) every chunk that
  starts past the largest group's count of wanted positions (`_active_chunks`, whose
  backward loops over the active chunks only), or, without remat, over the first rows up to
  a bucket boundary in one matmul (`_bucketed_stats`). Outputs go back to [B, M] by the
  inverse permutation. Unwanted positions inside a computed chunk or bucket are computed,
  then zeroed."""
  b, m, d = hidden_BxMxD.shape
  g = batch_groups(b)
  n = b // g * m
  c = chunk_size(n, config.logits_chunk)
  where_GxN = where_BxM.astype(bool).reshape(g, n)
  order_GxN = jnp.argsort(~where_GxN, axis=1, stable=True)
  inverse_GxN = jnp.argsort(order_GxN, axis=1)
  wanted = jnp.max(jnp.sum(where_GxN, axis=1, dtype=jnp.int32))
  hidden_GxNxD = permute(hidden_BxMxD.reshape(g, n, d), order_GxN, inverse_GxN)
  labels_GxN = _gather(labels_BxM.reshape(g, n), order_GxN)
  if _keeps_logits(config):
    size = n // buckets(n)
    stats = _bucketed_stats(config, with_entropy, size, kernel_DxV, hidden_GxNxD, labels_GxN,
                            (wanted + size - 1) // size)
  else:
    hidden_KxGxCxD = jnp.moveaxis(hidden_GxNxD.reshape(g, n // c, c, d), 1, 0)
    labels_KxGxC = jnp.moveaxis(labels_GxN.reshape(g, n // c, c), 1, 0)
    num_active = (wanted + c - 1) // c          # chunks holding a wanted position
    stats = _active_chunks(config, with_entropy, kernel_DxV, hidden_KxGxCxD, labels_KxGxC,
                           num_active)
    stats = {k: jnp.moveaxis(v, 0, 1).reshape(g, n) for k, v in stats.items()}
  out = {}
  for key, v_GxN in stats.items():
    if jnp.issubdtype(v_GxN.dtype, jnp.floating):
      v_GxN = permute(v_GxN, inverse_GxN, order_GxN)
    else:  # the hit: no gradient to carry
      v_GxN = _gather(v_GxN, inverse_GxN)
    out[key] = jnp.where(where_BxM, v_GxN.reshape(b, m), jnp.zeros((), v_GxN.dtype))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _active_chunks(config: ModelConfig, with_entropy: bool, kernel_DxV, hidden_KxGxCxD,
                   labels_KxGxC, num_active):
  """`_chunk_stats` of the first `num_active` of K chunks ([K, G, C] each), zeros for the
  rest. The backward recomputes each active chunk's logits and loops over the active chunks
  only, adding their kernel gradients into one [D, V] sum: a skipped chunk costs nothing in
  either direction (docs/attention.md, "Scoring only the targets")."""
  def chunk(xs):
    h_GxCxD, y_GxC, index = xs
    stats = lambda: _chunk_stats(config, h_GxCxD, kernel_DxV, y_GxC, with_entropy)
    skipped = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(stats))
    return jax.lax.cond(index < num_active, stats, skipped)

  k = hidden_KxGxCxD.shape[0]
  return jax.lax.map(chunk, (hidden_KxGxCxD, labels_KxGxC, jnp.arange(k, dtype=jnp.int32)))


def _keeps_logits(config: ModelConfig) -> bool:
  """Whether the head keeps its logits for the backward (`_bucketed_stats`) rather than
  recomputing them chunk by chunk (`_active_chunks`): when nothing is rematerialised."""
  return config.remat_policy == "none"


def _live(cotangent):
  """None for a symbolic-zero cotangent (a statistic the loss does not read: the entropy,
  a metric), else the cotangent: its term is left out of the backward."""
  return None if isinstance(cotangent, jax.custom_derivatives.SymbolicZero) else cotangent


def _d_logits(logits, labels, g_logp, g_ent, dtype):
  """d loss / d logits for cotangents g_logp and g_ent (None: zero) of the rows' log p(label)
  and entropy: g_logp (onehot - p) + g_ent p (E_p[logits] - logits), in the compute dtype."""
  probs = jax.nn.softmax(logits, axis=-1)
  d_logits = jnp.zeros_like(logits)
  if g_logp is not None:
    onehot = jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1) == labels[
        ..., None]
    d_logits = g_logp[..., None] * (onehot.astype(jnp.float32) - probs)
  if g_ent is not None:
    mean = expectation(probs, logits)[..., None]
    d_logits = d_logits + g_ent[..., None] * probs * (mean - logits)
  return nn.with_logical_constraint(d_logits.astype(dtype), ACT_LOGITS)


def _active_chunks_fwd(config, with_entropy, *primals):
  # symbolic_zeros=True: the primals come wrapped (`jax.custom_derivatives.CustomVJPPrimal`)
  kernel_DxV, hidden_KxGxCxD, labels_KxGxC, num_active = (x.value for x in primals)
  stats = _active_chunks(config, with_entropy, kernel_DxV, hidden_KxGxCxD, labels_KxGxC,
                         num_active)
  return stats, (kernel_DxV, hidden_KxGxCxD, labels_KxGxC, num_active)


def _active_chunks_bwd(config, with_entropy, residuals, cotangents):
  """d logp / d logits = onehot - p; d entropy / d logits = p (E_p[logits] - logits). The
  matmuls' transposes are autodiff's: the logits' cotangent is cast to the compute dtype,
  and each chunk's kernel gradient is cast to the kernel's dtype before the sum."""
  kernel_DxV, hidden_KxGxCxD, labels_KxGxC, num_active = residuals
  dtype = jnp.dtype(config.dtype)
  kernel = kernel_DxV.astype(dtype)
  g_logp_KxGxC = _live(cotangents["logp"])
  g_ent_KxGxC = _live(cotangents.get("entropy")) if with_entropy else None
  _, g, c, d = hidden_KxGxCxD.shape
  v = kernel_DxV.shape[1]
  at = lambda a, i: None if a is None else jax.lax.dynamic_index_in_dim(a, i, keepdims=False)

  def body(i, carry):
    d_hidden, d_kernel = carry
    h_GxCxD = at(hidden_KxGxCxD, i).astype(dtype)
    logits = matmul(h_GxCxD, kernel, 1)
    logits = nn.with_logical_constraint(logits, ACT_LOGITS).astype(jnp.float32)
    d_logits = _d_logits(logits, at(labels_KxGxC, i), at(g_logp_KxGxC, i),
                         at(g_ent_KxGxC, i), dtype)
    d_h, d_w = _head_transposes(d_logits.reshape(g * c, v), h_GxCxD.reshape(g * c, d), kernel)
    d_hidden = jax.lax.dynamic_update_index_in_dim(
        d_hidden, d_h.reshape(g, c, d).astype(d_hidden.dtype), i, 0)
    return d_hidden, d_kernel + d_w.astype(d_kernel.dtype)

  d_hidden, d_kernel = jax.lax.fori_loop(
      0, num_active, body, (jnp.zeros_like(hidden_KxGxCxD), jnp.zeros_like(kernel_DxV)))
  return d_kernel, d_hidden, None, None


def _head_transposes(d_logits_RxV, h_RxD, kernel_DxV):
  """(d hidden [R, D], d kernel [D, V]) of logits = h @ kernel for rows R."""
  d_h = jax.lax.dot_general(d_logits_RxV, kernel_DxV, (((1,), (1,)), ((), ())))
  d_w = jax.lax.dot_general(h_RxD, d_logits_RxV, (((0,), (0,)), ((), ())))
  return d_h, d_w


_active_chunks.defvjp(_active_chunks_fwd, _active_chunks_bwd, symbolic_zeros=True)


MAX_BUCKETS = 8


def buckets(n: int) -> int:
  """How many static sizes a computation over n sorted rows runs at: the largest divisor of
  n that is at most `MAX_BUCKETS` (sizes n/K, 2n/K, ..., n)."""
  return max(k for k in range(1, MAX_BUCKETS + 1) if n % k == 0)


def pad_rows(x_GxRx, n: int):
  """x padded with zero rows (axis 1) to n."""
  return jnp.pad(x_GxRx, ((0, 0), (0, n - x_GxRx.shape[1])) + ((0, 0),) * (x_GxRx.ndim - 2))


def bucket_switch(index, n: int, size: int, make_branch, *operands):
  """`lax.switch` over the row counts 0, size, ..., n: branch `index` is `make_branch(rows)`
  for rows = index * size."""
  return jax.lax.switch(index, [make_branch(j * size) for j in range(n // size + 1)],
                        *operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _bucketed_stats(config: ModelConfig, with_entropy: bool, size: int, kernel_DxV,
                    hidden_GxNxD, labels_GxN, index):
  """`_chunk_stats` of the first `index * size` of each group's N sorted rows as one matmul,
  zeros after them ([G, N] each): the head without remat (docs/attention.md, "Scoring only
  the targets"). The forward keeps the float32 logits (padded to [G, N, V]); the backward's
  branch reads them and runs the gradient's two matmuls. A `custom_vjp` for the reason
  `dcjax.model.wanted` gives: differentiating the switch returns every branch's residuals."""
  return _bucketed_forward(config, with_entropy, size, kernel_DxV, hidden_GxNxD, labels_GxN,
                           index)[0]


def _bucketed_forward(config, with_entropy, size, kernel_DxV, hidden_GxNxD, labels_GxN,
                      index):
  g, n, _ = hidden_GxNxD.shape
  full = jax.eval_shape(lambda: _chunk_stats(config, hidden_GxNxD, kernel_DxV, labels_GxN,
                                             with_entropy, True))

  def make_branch(rows):
    def run(kernel, hidden, labels):
      if rows == 0:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), full)
      stats = _chunk_stats(config, hidden[:, :rows], kernel, labels[:, :rows], with_entropy,
                           True)
      return jax.tree.map(lambda v: pad_rows(v, n), stats)
    return run

  stats = bucket_switch(index, n, size, make_branch, kernel_DxV, hidden_GxNxD, labels_GxN)
  logits = stats.pop("logits")
  return stats, logits


def _bucketed_stats_fwd(config, with_entropy, size, *primals):
  kernel_DxV, hidden_GxNxD, labels_GxN, index = (x.value for x in primals)
  stats, logits = _bucketed_forward(config, with_entropy, size, kernel_DxV, hidden_GxNxD,
                                    labels_GxN, index)
  return stats, (kernel_DxV, hidden_GxNxD, labels_GxN, index, logits)


def _bucketed_stats_bwd(config, with_entropy, size, residuals, cotangents):
  kernel_DxV, hidden_GxNxD, labels_GxN, index, logits_GxNxV = residuals
  dtype = jnp.dtype(config.dtype)
  g_logp, g_ent = _live(cotangents["logp"]), None
  if with_entropy:
    g_ent = _live(cotangents["entropy"])
  g, n, d = hidden_GxNxD.shape
  v = kernel_DxV.shape[1]
  live = [x for x in (g_logp, g_ent) if x is not None]

  def make_branch(rows):
    def run(kernel, hidden, labels, logits, *cts):
      if rows == 0:
        return jnp.zeros_like(kernel), jnp.zeros_like(hidden)
      cts = iter(c[:, :rows] for c in cts)
      ct_logp = None if g_logp is None else next(cts)
      ct_ent = None if g_ent is None else next(cts)
      d_logits = _d_logits(logits[:, :rows], labels[:, :rows], ct_logp, ct_ent, dtype)
      h = hidden[:, :rows].astype(dtype)
      d_h, d_w = _head_transposes(d_logits.reshape(g * rows, v), h.reshape(g * rows, d),
                                  kernel.astype(dtype))
      return (d_w.astype(kernel.dtype),
              pad_rows(d_h.reshape(g, rows, d).astype(hidden.dtype), n))
    return run

  d_kernel, d_hidden = bucket_switch(index, n, size, make_branch, kernel_DxV, hidden_GxNxD,
                                     labels_GxN, logits_GxNxV, *live)
  return d_kernel, d_hidden, None, None


_bucketed_stats.defvjp(_bucketed_stats_fwd, _bucketed_stats_bwd, symbolic_zeros=True)
