"""The train step as the run compiles it: one builder shared by `mode=train` and `mode=compile`,
so an ahead-of-time compile sees exactly the run's mesh, shardings, shapes and flags."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dcjax import model as model_lib
from dcjax.data import pipeline
from dcjax.train import optim
from dcjax.train import state as state_lib
from dcjax.train import step as step_lib
from dcjax.train.train_config import loss_config


@dataclasses.dataclass
class TrainProgram:
  step_fn: object            # jax.jit(train_step) with explicit shardings, state donated
  abstract_state: object     # TrainState of ShapeDtypeStructs carrying their shardings
  abstract_batch: dict       # the global batch's ShapeDtypeStructs
  shardings: state_lib.TrainState
  batch_shardings: dict
  tx: object
  schedule: object

  def lower(self, mesh):
    with jax.set_mesh(mesh):
      return self.step_fn.lower(self.abstract_state, self.abstract_batch)


def train_program(config, model_config, mesh, mask_id: int) -> TrainProgram:
  t, d = config.train, config.data
  tx, schedule = optim.make_optimizer(t, t.steps)
  abstract = state_lib.abstract_state(
      nn.meta.unbox(model_lib.abstract_params(model_config)), tx)
  shardings = state_lib.state_shardings(
      abstract, model_lib.param_shardings(model_config, mesh), tx, mesh)
  batch_shardings = {k: pipeline.batch_sharding(mesh) for k in pipeline.BATCH_KEYS}
  step_fn = step_lib.jit_train_step(
      step_lib.make_train_step(model_config, loss_config(config), tx, schedule,
                               micro_batches=t.micro_batches, mask_id=mask_id),
      shardings, batch_shardings, NamedSharding(mesh, PartitionSpec()))
  abstract_batch = {k: jax.ShapeDtypeStruct((t.batch_size, d.seq_len),
                                            bool if k == "prompt_mask" else np.int32,
                                            sharding=batch_shardings[k])
                    for k in pipeline.BATCH_KEYS}
  return TrainProgram(step_fn, state_lib.with_shardings(abstract, shardings), abstract_batch,
                      shardings, batch_shardings, tx, schedule)
