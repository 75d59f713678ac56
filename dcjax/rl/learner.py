"""The learner: RL state, AdamW, and the jitted scoring, update and reference-refresh steps.

One rollout batch is used for mu policy iterations (optimiser steps). Iteration k uses the
mask key fold_in(batch_key, k) for all three estimates it needs: the old policy's and the
reference's (both `score`, before any update) and the current policy's (inside `update`),
so they share the same t and u (docs/grpo.md). With mu = 1 the old estimate is the current one
under stop_gradient and the ratio is exactly 1.

The estimator's noise is drawn for the whole (global) batch from the key, then the batch
is split into `micro_batches` strided slices whose gradients are averaged: each
micro-batch's loss is its own token mean (docs/grpo.md), as in gradient accumulation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcjax import model as model_lib
from dcjax.rl import logprobs
from dcjax.rl import loss as loss_lib
from dcjax.train.accumulate import accumulate, merge_micro, split_micro

BATCH_AXES = ("data", "fsdp")
REF_UPDATES = ("hard", "soft")


@flax.struct.dataclass
class RLState:
  """step: optimiser steps taken; ref_params: None when beta == 0; rng: raw key data."""

  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  estimator: logprobs.EstimatorConfig = logprobs.EstimatorConfig()
  loss: loss_lib.PolicyLossConfig = loss_lib.PolicyLossConfig()
  micro_batches: int = 1
  ref_update: str = "hard"
  ref_mix_alpha: float = 0.6

  @property
  def uses_reference(self) -> bool:
    return self.loss.beta > 0


class Learner:
  """Jitted steps for one model / config / optimiser (and optionally a mesh).

  Batches are dicts of [B, ...] arrays: tokens_BxL, keep_BxL, completion_mask_BxN,
  advantages_B and, when used, old_logp_BxN (mu > 1) and ref_logp_BxN (beta > 0).
  """

  def __init__(self, model_config, cfg: LearnerConfig, tx: optax.GradientTransformation,
               schedule, *, mask_id: int, mesh: Mesh | None = None):
    if cfg.ref_update not in REF_UPDATES:
      raise ValueError(f"config.rl.ref_update={cfg.ref_update!r} is not one of {REF_UPDATES}")
    if cfg.micro_batches < 1:
      raise ValueError(f"config.rl.micro_batches={cfg.micro_batches} must be >= 1")
    cfg.estimator.validate()
    self.model_config, self.cfg, self.tx, self.schedule = model_config, cfg, tx, schedule
    self.mask_id, self.mesh = int(mask_id), mesh
    self._shardings = None
    if mesh is not None:
      batch = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
      self._batch_sharding = batch
      self._replicated = NamedSharding(mesh, PartitionSpec())
    self._score = self._jit(self._score_fn, kind="score")
    self._update = self._jit(self._update_fn, kind="update")
    self._refresh = self._jit(self._refresh_fn, kind="refresh")

  # ------------------------------------------------------------------ state
  def create(self, params, seed: int) -> RLState:
    ref = jax.tree.map(jnp.copy, params) if self.cfg.uses_reference else None
    return RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                   ref_params=ref, rng=jax.random.key_data(jax.random.key(seed)))

  def abstract_state(self) -> RLState:
    """ShapeDtypeStructs of the state (with their shardings under a mesh)."""
    abstract_params = nn.meta.unbox(model_lib.abstract_params(self.model_config))
    abstract = jax.eval_shape(lambda p: self.create(p, 0), abstract_params)
    if self.mesh is None:
      return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, self.state_shardings())

  def state_shardings(self) -> RLState:
    """Adam moments and the reference take their parameter's sharding; the rest replicated."""
    if self._shardings is None:
      if self.mesh is None:
        raise ValueError("state_shardings needs a mesh")
      params = model_lib.param_shardings(self.model_config, self.mesh)
      abstract_params = nn.meta.unbox(model_lib.abstract_params(self.model_config))
      opt_abstract = jax.eval_shape(self.tx.init, abstract_params)
      opt = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, params,
                                  transform_non_params=lambda _: self._replicated)
      self._shardings = RLState(step=self._replicated, params=params, opt_state=opt,
                                ref_params=params if self.cfg.uses_reference else None,
                                rng=self._replicated)
    return self._shardings

  def init_state(self, params, seed: int) -> RLState:
    """The initial state (a fresh copy of params as the reference when beta > 0)."""
    if self.mesh is None:
      return jax.jit(lambda p: self.create(p, seed))(params)
    shardings = self.state_shardings()
    return jax.jit(lambda p: self.create(p, seed), in_shardings=(shardings.params,),
                   out_shardings=shardings)(params)

  # ------------------------------------------------------------------ public steps
  def score(self, params, batch, key):
    """Per-token estimate logp_BxN of `params` under the estimator's masks from `key`."""
    return self._call(self._score, params, _model_inputs(batch), key)

  def update(self, state: RLState, batch, key):
    """One optimiser step on the whole batch; returns (state, metrics). Donates `state`."""
    return self._call(self._update, state, batch, key)

  def refresh_reference(self, state: RLState) -> RLState:
    """Hard copy (ref <- policy) or soft mix (ref <- a policy + (1 - a) ref). Donates."""
    if not self.cfg.uses_reference:
      return state
    return self._call(self._refresh, state)

  # ------------------------------------------------------------------ internals
  def _call(self, fn, *args):
    if self.mesh is None:
      return fn(*args)
    with jax.set_mesh(self.mesh):
      return fn(*args)

  def _jit(self, fn, kind: str):
    if self.mesh is None:
      donate = () if kind == "score" else (0,)
      return jax.jit(fn, donate_argnums=donate)
    return lambda *args: self.jitted(kind)(*args)  # shardings built on first call

  def jitted(self, kind: str):
    """The sharded jax.jit of 'score', 'update' or 'refresh' (what `lower` needs)."""
    if not hasattr(self, f"_compiled_{kind}"):
      s, batch, rep = self.state_shardings(), self._batch_sharding, self._replicated
      fn = getattr(self, f"_{kind}_fn")
      if kind == "score":
        jitted = jax.jit(fn, in_shardings=(s.params, batch, None), out_shardings=batch)
      elif kind == "update":
        jitted = jax.jit(fn, in_shardings=(s, batch, None), out_shardings=(s, rep),
                         donate_argnums=(0,))
      else:
        jitted = jax.jit(fn, in_shardings=(s,), out_shardings=s, donate_argnums=(0,))
      setattr(self, f"_compiled_{kind}", jitted)
    return getattr(self, f"_compiled_{kind}")

  def _logps(self, params, micro, noise, with_entropy=False):
    return logprobs.per_token_logps(
        self.model_config, params, micro["tokens_BxL"], noise, self.cfg.estimator, self.mask_id,
        keep_BxL=micro.get("keep_BxL"), with_entropy=with_entropy)

  def _noise(self, batch, key):
    b, n = batch["completion_mask_BxN"].shape
    return logprobs.draw_noise(key, b, n, self.cfg.estimator)

  def _score_fn(self, params, batch, key):
    noise = self._noise(batch, key)
    k = self.cfg.micro_batches
    if k == 1:
      return self._logps(params, batch, noise)[0]
    stacked = jax.tree.map(lambda x: split_micro(x, k), (batch, noise))
    out = jax.lax.map(lambda mb: self._logps(params, mb[0], mb[1])[0], stacked)
    return merge_micro(out)

  def _update_fn(self, state: RLState, batch, key):
    cfg = self.cfg
    noise = self._noise(batch, key)

    def loss_fn(params, micro, micro_noise):
      logp, entropy = self._logps(params, micro, micro_noise, with_entropy=True)
      loss, sums = loss_lib.grpo_loss(
          logp, micro.get("old_logp_BxN"), micro.get("ref_logp_BxN"), micro["advantages_B"],
          micro["completion_mask_BxN"], cfg.loss)
      mask = micro["completion_mask_BxN"].astype(jnp.float32)
      sums = dict(sums, entropy=jnp.sum(entropy * mask), loss=loss)
      return loss, sums

    k = cfg.micro_batches
    grads, sums = accumulate(jax.grad(lambda p, mb: loss_fn(p, *mb), has_aux=True),
                             state.params, (batch, noise), k)
    if k > 1:  # the loss is a token mean per micro-batch: average the k of them
      grads = jax.tree.map(lambda g: g / k, grads)
      sums = dict(sums, loss=sums["loss"] / k)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = dict(loss=sums["loss"], clip_fraction=sums["clipped"] / tokens,
                   kl=sums["kl"] / tokens, ratio=sums["ratio"] / tokens,
                   entropy=sums["entropy"] / tokens, grad_norm=grad_norm,
                   lr=jnp.asarray(self.schedule(state.step), jnp.float32),
                   nonfinite=(~jnp.isfinite(sums["loss"])) | (~jnp.isfinite(grad_norm)))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _refresh_fn(self, state: RLState):
    if self.cfg.ref_update == "hard":
      ref = jax.tree.map(jnp.copy, state.params)
    else:
      a = self.cfg.ref_mix_alpha
      ref = jax.tree.map(lambda p, r: (a * p + (1 - a) * r).astype(r.dtype), state.params,
                         state.ref_params)
    return state.replace(ref_params=ref)


def _model_inputs(batch):
  """The keys `score` reads (so unused loss inputs are not transferred)."""
  return {k: batch[k] for k in ("tokens_BxL", "keep_BxL", "completion_mask_BxN") if k in batch}
