"""The train state pytree and its shardings (parameters' layout carried into Adam's moments)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
  """step (int32 scalar), params, opt_state, and rng (raw uint32 key data, checkpointable)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def abstract_state(abstract_params, tx, seed: int = 0) -> TrainState:
  """ShapeDtypeStructs of the whole state; allocates nothing."""
  return jax.eval_shape(lambda p: create(p, tx, seed), abstract_params)


def state_shardings(abstract: TrainState, param_shardings, tx, mesh: Mesh) -> TrainState:
  """Adam moments take their parameter's sharding; counters, step and rng are replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract.opt_state,
                              param_shardings, transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt, rng=replicated)


def with_shardings(abstract: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying their target sharding (what orbax restores into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def init_state(params, tx, seed: int, shardings: TrainState) -> TrainState:
  """The initial state on the mesh, built by one sharded jit (params are consumed)."""
  return jax.jit(lambda p: create(p, tx, seed), in_shardings=(shardings.params,),
                 out_shardings=shardings, donate_argnums=(0,))(params)


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
