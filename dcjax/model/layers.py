"""Building blocks: RMSNorm, SwiGLU MLP, and the logical-axis-annotated initialisers."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dcjax.model.config import ModelConfig


def dtype_of(name: str):
  return jnp.dtype(name)


def param_init(config: ModelConfig, axes: Sequence[str], kind: str = "normal"):
  """An initialiser that tags the parameter with logical axis names."""
  if kind == "normal":
    base = nn.initializers.normal(stddev=config.initializer_range)
  elif kind == "zeros":
    base = nn.initializers.zeros_init()
  elif kind == "ones":
    base = nn.initializers.ones_init()
  else:
    raise ValueError(f"unknown initialiser kind {kind!r}")
  return nn.with_logical_partitioning(base, tuple(axes))


class RMSNorm(nn.Module):
  """x / rms(x) in float32, cast back to the activation dtype, then times the weight."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.config
    weight = self.param("weight", param_init(c, ("norm",), "ones"), (x_BxLxD.shape[-1],),
                        dtype_of(c.param_dtype))
    x = x_BxLxD.astype(jnp.float32)
    x = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps))
    return weight.astype(dtype_of(c.dtype)) * x.astype(x_BxLxD.dtype)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.config

    gate_BxLxF = Dense(c, (c.intermediate_size,), ("embed", "mlp"), name="gate_proj")(x_BxLxD)
    up_BxLxF = Dense(c, (c.intermediate_size,), ("embed", "mlp"), name="up_proj")(x_BxLxD)
    h_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
    h_BxLxF = nn.with_logical_constraint(
        h_BxLxF, ("activation_batch", "activation_length", "activation_mlp"))
    return Dense(c, (c.hidden_size,), ("mlp", "embed"), name="down_proj")(h_BxLxF)


def matmul(x, kernel, contract: int):
  """x [..., *in] · kernel [*in, *out] -> [..., *out] as one 2-D matmul [N, I] x [I, O].

  The same products as `jnp.tensordot`. In the 2-D form the weight gradient of the backward
  pass contracts one dimension (the N rows) instead of the batch and length dimensions, which
  XLA:CPU computed through a transposing copy of the activation gradient: the small model's
  forward + backward took 2.0 s instead of 2.2 s (docs/model.md, "Layers").
  """
  lead, ins = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  outs = kernel.shape[contract:]
  n, i, o = math.prod(lead), math.prod(ins), math.prod(outs)
  y = jnp.dot(x.reshape(n, i), kernel.reshape(i, o))
  return y.reshape(lead + outs)




class Dense(nn.Module):
  """y = x · W (+ b), contracting x's last `contract` dims with W's first ones.

  The kernel is created in its final multi-dimensional shape (e.g. [D, H, Dh]) so its
  logical axis names apply to it directly.
  """

  config: ModelConfig
  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  contract: int = 1
  bias_axes: tuple[str, ...] | None = None

  @nn.compact
  def __call__(self, x):
    c = self.config
    dtype, pdtype = dtype_of(c.dtype), dtype_of(c.param_dtype)
    in_shape = x.shape[x.ndim - self.contract:]
    kernel = self.param("kernel", param_init(c, self.kernel_axes), in_shape + self.features,
                        pdtype)
    y = matmul(x.astype(dtype), kernel.astype(dtype), self.contract)
    if self.bias_axes is not None:
      bias = self.param("bias", param_init(c, self.bias_axes, "zeros"), self.features, pdtype)
      y = y + bias.astype(dtype)
    return y


class Embed(nn.Module):
  """Token embedding `embedding` [V, D]. The table is gathered whole before the lookup, as
  FSDP gathers every weight where it is used; a lookup into the vocab/fsdp-sharded table
  would make XLA replicate the gather's output instead ("involuntary full
  rematerialization")."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL):
    c = self.config
    table_VxD = self.param("embedding", param_init(c, ("vocab", "embed")),
                           (c.vocab_size, c.hidden_size), dtype_of(c.param_dtype))
    table_VxD = nn.with_logical_constraint(table_VxD.astype(dtype_of(c.dtype)), (None, None))
    return jnp.take(table_VxD, tokens_BxL, axis=0)
