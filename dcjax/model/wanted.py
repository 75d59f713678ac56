"""The last layer's tail on the positions a caller reads (docs/model.md, "Rows the head
reads"): residual + post-attention norm + SwiGLU MLP + residual for the wanted rows only,
sorted wanted-first and cut at a static bucket boundary by `lax.switch`."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.model import head
from dcjax.model.config import ModelConfig
from dcjax.model.layers import RMSNorm, matmul

ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")


def tail(config: ModelConfig, params, x_BxWxD, attn_BxWxD):
  """`DecoderLayer`'s arithmetic after attention on its `post_attention_layernorm` and `mlp`
  parameters: r = x + attn; r + down(silu(gate(norm(r))) * up(norm(r)))."""
  r, h, gate, up = _front(config, params, x_BxWxD, attn_BxWxD)
  return _back(config, params, r, gate, up)


def _norm(config, weight, r):
  return RMSNorm(config, parent=None).apply({"params": {"weight": weight}}, r)


def _dense(config, x, kernel):  # `layers.Dense` without bias
  dtype = jnp.dtype(config.dtype)
  return matmul(x.astype(dtype), kernel.astype(dtype), 1)


def _front(config, params, x, attn):
  r = x + attn
  h = _norm(config, params["post_attention_layernorm"]["weight"], r)
  mlp = params["mlp"]
  return (r, h, _dense(config, h, mlp["gate_proj"]["kernel"]),
          _dense(config, h, mlp["up_proj"]["kernel"]))


def _product(gate, up):
  return nn.with_logical_constraint(nn.silu(gate) * up, ACT_MLP)


def _back(config, params, r, gate, up):
  return r + _dense(config, _product(gate, up), params["mlp"]["down_proj"]["kernel"])


def tail_on_wanted(config: ModelConfig, params, x_BxWxD, attn_BxWxD, wanted_BxW):
  """`tail` at the rows where `wanted_BxW` is True, zeros elsewhere.

  The B rows form the head's batch groups (`head.batch_groups`: one per batch shard, so no
  row leaves its shard); within each group the B/G * W positions are sorted wanted-first
  and the tail runs on the first j * n/K of them, j the smallest bucket holding the largest
  group's wanted count (K = `head.buckets(n)`, `_bucketed`). Rows computed but not wanted are
  zeroed. The gathers are `head.permute` (differentiated as the inverse gather)."""
  b, w, d = x_BxWxD.shape
  g = head.batch_groups(b)
  n = b // g * w
  size = n // head.buckets(n)
  where_GxN = wanted_BxW.astype(bool).reshape(g, n)
  order_GxN = jnp.argsort(~where_GxN, axis=1, stable=True)
  inverse_GxN = jnp.argsort(order_GxN, axis=1)
  count = jnp.max(jnp.sum(where_GxN, axis=1, dtype=jnp.int32))
  x_GxNxD = head.permute(x_BxWxD.reshape(g, n, d), order_GxN, inverse_GxN)
  attn_GxNxD = head.permute(attn_BxWxD.reshape(g, n, d), order_GxN, inverse_GxN)
  y_GxNxD = _bucketed(config, size, params, x_GxNxD, attn_GxNxD, (count + size - 1) // size)
  y_BxWxD = head.permute(y_GxNxD, inverse_GxN, order_GxN).reshape(b, w, d)
  return jnp.where(wanted_BxW[..., None], y_BxWxD, jnp.zeros((), y_BxWxD.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bucketed(config, size: int, params, x_GxNxD, attn_GxNxD, index):
  """`tail` on the first `index * size` of the N rows of each group, zeros after them.

  A `custom_vjp`: differentiating the switch would make its forward return the residuals of
  every branch (zeros for those not taken: 110 arrays for the tiny model, most of a step's
  memory traffic). Here the forward returns the taken branch's normed input and gate / up
  activations padded to N rows, and the backward's branch differentiates the tail's pieces
  at them: the matmuls by their transposes (`jax.linear_transpose`), so the only forward
  arithmetic it repeats is the residual sum, the norm and the SwiGLU product."""
  return _bucketed_fwd(config, size, params, x_GxNxD, attn_GxNxD, index)[0]


def _bucketed_fwd(config, size, params, x_GxNxD, attn_GxNxD, index):
  n, f = x_GxNxD.shape[1], config.intermediate_size

  def make_branch(rows):
    def run(p, x, attn):
      if rows == 0:
        g_ = x.shape[0]
        zeros = jnp.zeros((g_, n, f), jnp.dtype(config.dtype))
        return jnp.zeros_like(x), jnp.zeros_like(x, jnp.dtype(config.dtype)), zeros, zeros
      r, h, gate, up = _front(config, p, x[:, :rows], attn[:, :rows])
      y = _back(config, p, r, gate, up)
      return tuple(head.pad_rows(a, n) for a in (y, h, gate, up))
    return run

  y, h, gate, up = head.bucket_switch(index, n, size, make_branch, params, x_GxNxD,
                                      attn_GxNxD)
  return y, (params, x_GxNxD, attn_GxNxD, h, gate, up, index)


def _bucketed_bwd(config, size, residuals, dy_GxNxD):
  params, x_GxNxD, attn_GxNxD, h_all, gate_all, up_all, index = residuals
  n = x_GxNxD.shape[1]
  dtype = jnp.dtype(config.dtype)

  def make_branch(rows):
    def run(p, x, attn, h, gate, up, dy):
      if rows == 0:
        return jax.tree.map(jnp.zeros_like, p), jnp.zeros_like(x), jnp.zeros_like(attn)
      x, attn, h, gate, up, dy = (a[:, :rows] for a in (x, attn, h, gate, up, dy))
      mlp = p["mlp"]
      kernels = {k: mlp[k]["kernel"] for k in ("gate_proj", "up_proj", "down_proj")}
      # y = r + down(m): the down matmul's transposes
      m, product_vjp = jax.vjp(_product, gate, up)
      d_m, = jax.linear_transpose(
          lambda m_: _dense(config, m_, kernels["down_proj"]), m)(dy.astype(dtype))
      d_down, = jax.linear_transpose(
          lambda k_: _dense(config, m, k_), kernels["down_proj"])(dy.astype(dtype))
      d_gate, d_up = product_vjp(d_m)
      # gate = h Wg, up = h Wu
      d_h = (jax.linear_transpose(lambda h_: _dense(config, h_, kernels["gate_proj"]), h)(
          d_gate)[0] + jax.linear_transpose(
              lambda h_: _dense(config, h_, kernels["up_proj"]), h)(d_up)[0])
      d_wg, = jax.linear_transpose(lambda k_: _dense(config, h, k_),
                                   kernels["gate_proj"])(d_gate)
      d_wu, = jax.linear_transpose(lambda k_: _dense(config, h, k_),
                                   kernels["up_proj"])(d_up)
      # h = norm(r), r = x + attn
      weight = p["post_attention_layernorm"]["weight"]
      _, norm_vjp = jax.vjp(lambda w_, r_: _norm(config, w_, r_), weight, x + attn)
      d_weight, d_r = norm_vjp(d_h.astype(h.dtype))
      d_r = d_r + dy
      dp = {"post_attention_layernorm": {"weight": d_weight},
            "mlp": {"gate_proj": {"kernel": d_wg}, "up_proj": {"kernel": d_wu},
                    "down_proj": {"kernel": d_down}}}
      return (dp, head.pad_rows(d_r.astype(x.dtype), n),
              head.pad_rows(d_r.astype(attn.dtype), n))
    return run

  dp, dx, dattn = head.bucket_switch(index, n, size, make_branch, params, x_GxNxD,
                                     attn_GxNxD, h_all, gate_all, up_all, dy_GxNxD)
  return dp, dx, dattn, None


_bucketed.defvjp(_bucketed_fwd, _bucketed_bwd)
