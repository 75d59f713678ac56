"""The parameter pytree: abstract shapes, logical-axis shardings, and random initialisation
straight into a sharded layout (docs/sharding.md)."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh

from dcjax.model.config import ModelConfig
from dcjax.model.transformer import Transformer
from dcjax.parallel.rules import LOGICAL_AXIS_RULES


def _init_fn(config: ModelConfig):
  model = Transformer(config)

  def init(rng):
    tokens = jax.numpy.zeros((1, 1), "int32")
    return model.init(rng, tokens, tokens, None)["params"]

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
