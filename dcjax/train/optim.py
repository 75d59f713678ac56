"""optax AdamW with linear warmup + cosine decay and global-norm clipping: the one optimiser
of training and coupled-GRPO."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def make_schedule(section, total_steps: int) -> optax.Schedule:
  """0 -> lr over `warmup_steps`, then cosine to `lr * end_lr_ratio` at `total_steps`."""
  lr, warmup = float(section.lr), int(section.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(int(total_steps), warmup + 1), end_value=lr * float(section.end_lr_ratio))


def decay_mask(params):
  """Weight decay on leaves named `kernel` or `embedding` (not biases or norm weights), as
  in the Hugging Face trainer the released code uses.

  Chosen by name: the scanned layers stack biases and norm weights into 2-D arrays.
  """
  def decays(path, _):
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last))) in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(section, total_steps: int, *, fused: bool = True
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip -> AdamW(schedule), schedule) from a config section holding lr, b1, b2, adam_eps,
  weight_decay, warmup_steps, end_lr_ratio and grad_clip (`config.train` for training,
  `config.optim` for coupled-GRPO). Gradient accumulation lives in the steps.

  The transformation is optax's `chain(clip_by_global_norm, adamw)`: its `init` and state
  layout (so checkpoints), and with `fused` (the default) an `update` that evaluates the same
  expressions in one elementwise pass per leaf (`_fused_update`).
  """
  schedule = make_schedule(section, total_steps)
  clip = float(section.grad_clip) if section.grad_clip and section.grad_clip > 0 else None
  hyper = dict(b1=float(section.b1), b2=float(section.b2), eps=float(section.adam_eps),
               weight_decay=float(section.weight_decay))
  parts = [optax.clip_by_global_norm(clip)] if clip else []
  parts.append(optax.adamw(schedule, mask=decay_mask, **hyper))
  reference = optax.chain(*parts)
  if not fused:
    return reference, schedule
  update = functools.partial(_fused_update, schedule=schedule, clip=clip, **hyper)
  return optax.GradientTransformation(reference.init, update), schedule


def _fused_update(grads, state, params, *, schedule, clip, b1, b2, eps, weight_decay):
  """`chain(clip_by_global_norm(clip), adamw(...)).update` as one expression per leaf.

  optax clips with `select(norm < clip, g, g / norm * clip)` and then runs Adam, the masked
  decay and the learning rate as separate tree passes. XLA:CPU fuses that chain poorly (the
  select keeps the clipped gradient in memory for its two consumers): clip + AdamW took 2.6x
  the time of this form on a 100M-parameter tree (benchmarks/train_step.py). Here the clip is
  `g * s` with the scalar s = 1 below the threshold (exactly g) and s = clip / norm above
  it, where optax computes `(g / norm) * clip`. A product by a scalar is cheap enough for
  XLA to repeat inside both fusions that read the clipped gradient (mu and nu); a division
  made it write that gradient out and read it back (clip + AdamW of the small model's
  stacked 100M parameters on 2 CPU cores: 130 -> 103 ms; docs/performance.md). The other
  operations are optax's own, in its order: the values agree with optax's to float32
  rounding (a clipped gradient may differ in its last bit, and XLA may contract a
  multiply-add into an FMA in one program and not the other; tests/test_optim.py).
  """
  if params is None:
    raise ValueError("the AdamW update needs params (weight decay)")
  clip_state, (adam, masked, sched) = state if clip else ((),) + tuple(state)
  if clip:
    norm = optax.tree.norm(grads)
    below = jnp.squeeze(norm < clip)
    scale = jnp.where(below, 1.0, clip / norm)
  count = optax.safe_increment(adam.count)
  correction1, correction2 = 1 - b1 ** count, 1 - b2 ** count
  step_size = -1 * schedule(sched.count)

  def leaf(g, mu, nu, p, decays):
    if clip:
      g = g * scale.astype(g.dtype)
    mu = (1 - b1) * (g ** 1) + b1 * mu
    nu = (1 - b2) * (g ** 2) + b2 * nu
    u = (mu / correction1.astype(mu.dtype)) / (
        jnp.sqrt(nu / correction2.astype(nu.dtype) + 0.0) + eps)
    if decays:
      u = u + weight_decay * p
    return jnp.array(step_size, dtype=u.dtype) * u, mu, nu

  out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params, decay_mask(params))
  treedef = jax.tree.structure(grads)
  updates, mu, nu = (jax.tree.unflatten(treedef, list(x))
                     for x in zip(*treedef.flatten_up_to(out)))
  adamw_state = (adam._replace(count=count, mu=mu, nu=nu), masked,
                 sched._replace(count=optax.safe_increment(sched.count)))
  return updates, ((clip_state, adamw_state) if clip else (adamw_state,))
