"""Optional masked-diffusion SFT on the tasks' reference solutions before RL (the tiny demo).

A random tiny model never writes a ```python block, so every reward would be 0; DiffuCoder
starts RL from an Instruct model for the same reason. This gives the demo a weak starting
policy: rows are [left-padded prompt, fenced solution, chat end, pads to N], trained with the
SFT loss of `dcjax.diffusion.losses` (docs/losses.md).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcjax import model as model_lib
from dcjax.diffusion import losses
from dcjax.rl import prompts as prompts_lib


def sft_rows(tasks, tokenizer, *, max_prompt_len: int, num_new: int, system_prompt,
             add_first_test: bool = True, pad_multiple: int = 1):
  """(prompt_ids_BxP, prompt_mask_BxP, completion_BxN) for every task with a solution."""
  prompts, completions = [], []
  for task in tasks:
    if not task.get("solution"):
      continue
    text = prompts_lib.prompt_text(tokenizer, task, system_prompt, add_first_test)
    prompts.append(prompts_lib.encode_prompt(tokenizer, text, max_prompt_len))
    ids = tokenizer.encode(prompts_lib.fenced_answer(task["solution"]))
    ids = (ids + [tokenizer.chat_end_id] + [tokenizer.pad_id] * num_new)[:num_new]
    completions.append(ids)
  if not prompts:
    raise ValueError("config.warm_start.steps > 0 but no task has a reference solution")
  p = min(max_prompt_len, -(-max(len(x) for x in prompts) // pad_multiple) * pad_multiple)
  ids = np.full((len(prompts), p), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(prompts), p), bool)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):], mask[i, p - len(x):] = x, True
  return ids, mask, np.asarray(completions, np.int32)


# docs/losses.md's SFT loss: the prompt is never masked, pads are targets, token mean over
# masked targets, 1/t weights; left padding hidden through the segment ids and positions.
SFT_LOSS = losses.LossConfig(document_mask=True)


def sft_loss(model_config, params, prompt_ids_BxP, prompt_mask_BxP, completion_BxN, key,
             mask_id: int):
  """The masked-diffusion SFT loss of [left-padded prompt, completion] rows."""
  b, n = completion_BxN.shape
  keep_BxL = jnp.concatenate([prompt_mask_BxP, jnp.ones((b, n), bool)], axis=1)
  batch = dict(
      tokens=jnp.concatenate([prompt_ids_BxP, completion_BxN], axis=1),
      segment_ids=keep_BxL.astype(jnp.int32), positions=model_lib.keep_positions(keep_BxL),
      prompt_mask=jnp.concatenate([jnp.ones(prompt_ids_BxP.shape, bool),
                                   jnp.zeros((b, n), bool)], axis=1))
  apply = lambda p, tokens, mask, positions: model_lib.apply(model_config, p, tokens, mask,
                                                             positions)
  return losses.diffusion_loss(apply, params, batch, key, mask_id, SFT_LOSS)[0]


def warm_start(model_config, params, tasks, tokenizer, *, steps: int, batch_size: int,
               lr: float, max_prompt_len: int, num_new: int, system_prompt, seed: int,
               add_first_test: bool = True, log=print, log_every: int = 50):
  """Returns params after `steps` AdamW steps of SFT on the tasks' solutions."""
  ids, mask, comp = sft_rows(tasks, tokenizer, max_prompt_len=max_prompt_len, num_new=num_new,
                             system_prompt=system_prompt, add_first_test=add_first_test)
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.1), b1=0.9, b2=0.98,
                   weight_decay=0.01)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rows, key):
    loss, grads = jax.value_and_grad(
        lambda p: sft_loss(model_config, p, *rows, key, model_config.mask_token_id))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for i in range(steps):
    pick = rng.choice(len(ids), size=batch_size, replace=len(ids) < batch_size)
    params, opt_state, loss = step(params, opt_state, (ids[pick], mask[pick], comp[pick]),
                                   jax.random.key(seed * 100_003 + i))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      log(f"warm start {i + 1:4d}/{steps} | SFT loss {float(loss):.3f} | "
          f"{time.perf_counter() - start:.0f}s")
  return params
