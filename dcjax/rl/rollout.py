"""Rollouts: G completions per prompt from the jitted sampler, on the learner's params and mesh.

`rollout` repeats each left-padded prompt G times (rows g*G .. g*G+G-1 belong to prompt g),
calls `dcjax.diffusion.sampler.generate` with the learner's parameter pytree as it is (no
copy, same mesh) and returns device arrays plus the completion mask: the tokens up to and
including the first chat-end token (all of them when there is none).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcjax.diffusion.sampler import generate

BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class Rollout:
  """Device arrays of one rollout batch (B = prompts x G rows).

  tokens_BxL          int32  left-padded prompt followed by the N completion tokens
  keep_BxL            bool   the prompt's keep-mask extended with ones (real tokens)
  completion_mask_BxN bool   completion tokens up to and including the first chat end
  reveal_step_BxN     int32  sampler step at which each completion token was revealed
  """

  tokens_BxL: jax.Array
  keep_BxL: jax.Array
  completion_mask_BxN: jax.Array
  reveal_step_BxN: jax.Array

  @property
  def num_new(self) -> int:
    return self.completion_mask_BxN.shape[1]


def completion_mask(completion_BxN, end_id: int):
  """True up to and including the first `end_id` of each row (every token if none)."""
  is_end = completion_BxN == end_id
  ends_before = jnp.cumsum(is_end, axis=1) - is_end  # end tokens strictly before position
  return ends_before == 0


def repeat_prompts(prompt_ids_BxP, prompt_mask_BxP, group_size: int):
  """Host arrays -> each row repeated G times consecutively (np.repeat layout)."""
  ids = np.repeat(np.asarray(prompt_ids_BxP, np.int32), group_size, axis=0)
  mask = np.repeat(np.asarray(prompt_mask_BxP, bool), group_size, axis=0)
  return ids, mask


def to_global(x_local, mesh: Mesh | None):
  """Host-local rows -> one array sharded over the mesh's batch axes (or a plain array)."""
  if mesh is None:
    return jnp.asarray(x_local)
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  return jax.make_array_from_process_local_data(sharding, np.asarray(x_local))


def to_host(x, mesh: Mesh | None) -> np.ndarray:
  """A batch-sharded global array -> this host's rows as numpy."""
  if mesh is None or jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, PartitionSpec(BATCH_AXES)))


def rollout(model_config, params, prompt_ids_BxP, prompt_mask_BxP, *, group_size: int,
            sampler_kwargs: dict, rng, end_id: int, mesh: Mesh | None = None) -> Rollout:
  """G completions per host-local prompt row; returns global device arrays.

  `sampler_kwargs` are `generate`'s keyword arguments (max_new_tokens, steps, alg,
  temperature, top_p, ...; see `sampler_config.sampler_kwargs`).
  """
  ids, mask = repeat_prompts(prompt_ids_BxP, prompt_mask_BxP, group_size)
  ids_g, mask_g = to_global(ids, mesh), to_global(mask, mesh)
  out = generate(model_config, params, ids_g, mask_g, rng=rng, mesh=mesh, **sampler_kwargs)
  keep, comp_mask, reveal = _finish(out.tokens, mask_g, out.reveal_step, end_id)
  return Rollout(tokens_BxL=out.tokens, keep_BxL=keep, completion_mask_BxN=comp_mask,
                 reveal_step_BxN=reveal)


@jax.jit
def _finish(tokens_BxL, mask_BxP, reveal_BxL, end_id):
  """(keep_BxL, completion_mask_BxN, reveal_step_BxN), on the rollout's sharding."""
  n = tokens_BxL.shape[1] - mask_BxP.shape[1]
  keep = jnp.concatenate([mask_BxP, jnp.ones((mask_BxP.shape[0], n), bool)], axis=1)
  return keep, completion_mask(tokens_BxL[:, -n:], end_id), reveal_BxL[:, -n:]


@dataclasses.dataclass
class HostRollout:
  """This host's rows of a rollout as numpy (what rewards and metrics read)."""

  completion_BxN: np.ndarray
  completion_mask_BxN: np.ndarray
  reveal_step_BxN: np.ndarray
  group_size: int

  @property
  def prompt_index_B(self) -> np.ndarray:
    """Row -> index of its prompt in the host-local prompt batch."""
    return np.arange(self.completion_BxN.shape[0]) // self.group_size


def to_host_rollout(r: Rollout, group_size: int, mesh: Mesh | None) -> HostRollout:
  n = r.num_new
  return HostRollout(completion_BxN=to_host(r.tokens_BxL, mesh)[:, -n:],
                     completion_mask_BxN=to_host(r.completion_mask_BxN, mesh),
                     reveal_step_BxN=to_host(r.reveal_step_BxN, mesh), group_size=group_size)
