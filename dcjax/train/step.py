"""The jitted train and eval steps.

One step: key = fold_in(state.rng, state.step); the forward process is drawn for the whole
global batch from that key (so resume, sharding and micro-batching all see the same masks);
the gradient of `sum(weighted CE) / normaliser(global batch)` is accumulated over
`micro_batches` slices with `lax.scan`, which makes k micro-batches add up to exactly the
big-batch gradient; then clip + AdamW.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dcjax import model as model_lib
from dcjax.diffusion import forward_process as fp
from dcjax.diffusion import losses
from dcjax.train.accumulate import accumulate
from dcjax.train.state import TrainState


def _step_key(state: TrainState):
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def make_train_step(model_config, loss_config: losses.LossConfig,
                    tx: optax.GradientTransformation, schedule: Callable, *,
                    micro_batches: int = 1, mask_id: int | None = None):
  """train_step(state, batch) -> (state, metrics) (not jitted; see `jit_train_step`)."""
  mask_id = model_config.mask_token_id if mask_id is None else mask_id
  if mask_id is None:
    raise ValueError("config.model.mask_token_id is unset: the diffusion loss needs it")
  noise_cfg = loss_config.noise

  def train_step(state: TrainState, batch):
    b, l = batch["tokens"].shape
    noise = fp.draw_noise(_step_key(state), b, l, noise_cfg)
    prepared = losses.prepare(batch, noise, mask_id, loss_config)
    denominator = losses.normaliser(prepared, loss_config)
    anneal_LxL = None
    if noise.anneal_u_LxL is not None:
      anneal_LxL = fp.annealed_attention_mask(
          noise.anneal_u_LxL, fp.anneal_ratio(state.step, noise_cfg.anneal_steps))

    def loss_fn(params, micro):
      mask, positions = losses.model_inputs(micro, anneal_LxL, loss_config)
      hidden = model_lib.hidden(model_config, params, micro["noisy"], mask, positions,
                                wanted=losses.scored_positions(micro))
      sums = losses.hidden_loss_sums(model_config, params, hidden, micro)
      return sums["loss_sum"] / denominator, sums

    grads, sums = accumulate(jax.grad(loss_fn, has_aux=True), state.params, prepared,
                             micro_batches)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = losses.summarise(sums, denominator)
    metrics.update(grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32),
                   targets=sums["targets"],
                   nonfinite=(~jnp.isfinite(metrics["loss"])) | (~jnp.isfinite(grad_norm)))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_shardings, batch_sharding, metrics_sharding):
  """jax.jit with explicit in/out shardings; the old state's buffers are donated."""
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))


def eval_loss_config(loss_config: losses.LossConfig) -> losses.LossConfig:
  """Held-out ELBO: fully bidirectional attention and no truncation."""
  return dataclasses.replace(loss_config, noise=fp.NoiseConfig(eps=loss_config.noise.eps))


def make_eval_step(model_config, loss_config: losses.LossConfig, mask_id: int | None = None):
  """eval_step(params, batch, key) -> loss sums (add them over batches, then `summarise`)."""
  mask_id = model_config.mask_token_id if mask_id is None else mask_id
  cfg = eval_loss_config(loss_config)

  def eval_step(params, batch, key):
    b, l = batch["tokens"].shape
    noise = fp.draw_noise(key, b, l, cfg.noise)
    prepared = losses.prepare(batch, noise, mask_id, cfg)
    mask, positions = losses.model_inputs(prepared, None, cfg)
    hidden = model_lib.hidden(model_config, params, prepared["noisy"], mask, positions,
                              wanted=losses.scored_positions(prepared))
    return losses.hidden_loss_sums(model_config, params, hidden, prepared)

  return eval_step
