"""optax AdamW with linear warmup + cosine decay and global-norm clipping, from `config.train`."""

from __future__ import annotations

import jax
import optax


def make_schedule(train_config) -> optax.Schedule:
  """0 -> lr over `warmup_steps`, then cosine to `lr * end_lr_ratio` at `steps`."""
  lr, warmup, steps = float(train_config.lr), int(train_config.warmup_steps), int(train_config.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=lr * float(train_config.end_lr_ratio))


def decay_mask(params):
  """Weight decay on leaves named `kernel` or `embedding` (not biases or norm weights).

  Chosen by name: the scanned layers stack biases and norm weights into 2-D arrays.
  """
  def decays(path, _):
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last))) in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip -> AdamW(schedule), schedule). Gradient accumulation lives in the train step."""
  schedule = make_schedule(train_config)
  parts = []
  if train_config.grad_clip and train_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(train_config.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(train_config.b1), b2=float(train_config.b2),
                           eps=float(train_config.adam_eps),
                           weight_decay=float(train_config.weight_decay), mask=decay_mask))
  return optax.chain(*parts), schedule
