"""Parameter shardings from logical axis names, and initialisation straight into them."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcjax.model.config import ModelConfig
from dcjax.model.transformer import Transformer
from dcjax.parallel.rules import LOGICAL_AXIS_RULES


def _init_fn(config: ModelConfig):
  model = Transformer(config)
  tokens = jax.ShapeDtypeStruct((1, 1), "int32")

  def init(rng):
    positions = jax.numpy.zeros((1, 1), "int32")
    return model.init(rng, jax.numpy.zeros(tokens.shape, tokens.dtype), positions, None)["params"]

  return init


def abstract_params(config: ModelConfig):
  """Shapes and dtypes of the parameter pytree, boxed with logical axis names; allocates nothing."""
  return jax.eval_shape(_init_fn(config), jax.random.key(0))


def logical_specs(config: ModelConfig):
  """PartitionSpecs of logical axis names, one per parameter."""
  return nn.get_partition_spec(abstract_params(config))


def param_shardings(config: ModelConfig, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedSharding per parameter under `rules`."""
  return nn.logical_to_mesh_sharding(logical_specs(config), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def init_params(config: ModelConfig, rng: jax.Array, mesh: Mesh | None = None,
                rules=LOGICAL_AXIS_RULES):
  """Random parameters; with a mesh each device only ever holds its own shard."""
  init = _init_fn(config)
  if mesh is None:
    return nn.meta.unbox(jax.jit(init)(rng))
  shardings = param_shardings(config, mesh, rules)
  # No mesh context while tracing: flax would constrain DenseGeneral's flat kernel before
  # its reshape. The out_shardings alone make XLA generate each shard on its own device.
  return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def to_host(x) -> np.ndarray:
  """All of `x` as numpy on every process. `device_get` alone fails on an array whose shards
  live on several hosts (a batch-sharded sampler output on a pod); those are all-gathered."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
