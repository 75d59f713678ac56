"""optax AdamW with linear warmup + cosine decay and global-norm clipping: the one optimiser
of training and coupled-GRPO."""

from __future__ import annotations

import jax
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


def make_optimizer(section, total_steps: int) -> tuple[optax.GradientTransformation,
                                                       optax.Schedule]:
  """(clip -> AdamW(schedule), schedule) from a config section holding lr, b1, b2, adam_eps,
  weight_decay, warmup_steps, end_lr_ratio and grad_clip (`config.train` for training,
  `config.optim` for coupled-GRPO). Gradient accumulation lives in the steps."""
  schedule = make_schedule(section, total_steps)
  parts = []
  if section.grad_clip and section.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(section.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(section.b1), b2=float(section.b2),
                           eps=float(section.adam_eps),
                           weight_decay=float(section.weight_decay), mask=decay_mask))
  return optax.chain(*parts), schedule
