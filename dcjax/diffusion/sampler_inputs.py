"""`generate`'s inputs: checks of the prompt batch and the options, and the host-side
preparation of one call (static settings, schedule arrays, option scalars)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dcjax.diffusion.sampler_program import BATCH_AXES, Static
from dcjax.diffusion.schedule import ALGS, build_schedule

CACHE_MODES = (None, "prefix", "dual")


def check_prompts(ids, mask):
  """(int32 ids, bool keep-mask) of a [B, P] left-padded prompt batch, or a ValueError."""
  if ids is None or np.ndim(ids) != 2:
    raise ValueError(f"prompt_ids_BxP must have shape [B, P]; got shape {np.shape(ids)}")
  b, p = np.shape(ids)
  if p < 1 or b < 1:
    raise ValueError(f"prompt_ids_BxP has shape {(b, p)}; need B >= 1 and P >= 1 (the first "
                     "completion token is predicted from the last prompt position)")
  if mask is None:
    mask = np.ones((b, p), bool)
  if np.shape(mask) != (b, p):
    raise ValueError(f"prompt_mask_BxP has shape {np.shape(mask)}; expected [B, P] = {(b, p)}")
  if not isinstance(mask, jax.Array) or mask.is_fully_addressable:
    keep = np.asarray(mask).astype(bool)
    left_padded = (np.diff(keep.astype(np.int8), axis=1) >= 0).all()
    if not left_padded:
      raise ValueError("prompt_mask_BxP must be left padding (each row 0...0 1...1)")
  ids = ids if isinstance(ids, jax.Array) else np.asarray(ids)
  mask = mask if isinstance(mask, jax.Array) else np.asarray(mask)
  return ids.astype(jnp.int32), mask.astype(bool)


def prompt_mask_counts(ids, keep, mask_id: int) -> np.ndarray:
  """int64 [B]: the mask tokens among each row's real prompt tokens (infilling)."""
  if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
    # A multi-host batch: count on the devices, replicate the [B] result to every process.
    replicated = NamedSharding(ids.sharding.mesh, PartitionSpec())
    counts = jax.jit(lambda i, k: jnp.sum((i == mask_id) & k, axis=1),
                     out_shardings=replicated)(ids, keep)
    return np.asarray(counts.addressable_data(0)).astype(np.int64)
  return ((np.asarray(ids) == mask_id) & np.asarray(keep, bool)).sum(axis=1).astype(np.int64)


def check_options(alg, temperature, top_p, top_k, alg_temp, threshold, cache, refresh_every,
                  cfg_scale=0.0):
  """Raises ValueError naming the first sampler option out of its range."""
  if alg not in ALGS:
    raise ValueError(f"alg={alg!r} is not one of {ALGS}")
  if cfg_scale is None or cfg_scale < 0:
    raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (0: no guidance)")
  if cfg_scale > 0 and cache is not None:
    raise ValueError(f"cfg_scale={cfg_scale} with cache={cache!r}: the unconditional pass would "
                     "need a cache of its own; use cache=None with guidance")
  if temperature is None or temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] or None")
  if top_k is not None and int(top_k) < 1:
    raise ValueError(f"top_k={top_k} must be >= 1 or None")
  if alg_temp is not None and alg_temp < 0:
    raise ValueError(f"alg_temp={alg_temp} must be >= 0 or None")
  if threshold is not None:
    if not 0 <= threshold <= 1:
      raise ValueError(f"threshold={threshold} must be in [0, 1] or None")
    if alg == "origin":
      raise ValueError("threshold decoding ranks positions by confidence; alg='origin' has "
                       "none: use maskgit_plus, topk_margin or entropy")
  if cache not in CACHE_MODES:
    raise ValueError(f"cache={cache!r} is not one of {CACHE_MODES}")
  if refresh_every < 0:
    raise ValueError(f"cache_refresh_every={refresh_every} must be >= 0")


def program_inputs(c, shape, *, max_new_tokens: int, steps: int, alg: str,
                   temperature: float = 0.0, top_p=None, top_k=None, alg_temp=None,
                   eps: float = 1e-3, block_length=None, threshold=None, cache=None,
                   cache_refresh_every: int = 0, rng=None, return_history: bool = False,
                   mesh=None, cfg_scale: float = 0.0, logits_eos_inf: bool = False,
                   confidence_eos_eot_inf: bool = False, early_stop: bool = False,
                   end_token_ids: Sequence[int] | None = None,
                   prompt_masks: np.ndarray | None = None):
  """(static settings, schedule arrays, option scalars, rng) of one `generate` call.

  `prompt_masks`: each row's number of mask tokens in the prompt (`prompt_mask_counts`);
  any makes the call an infilling one (the region is the whole canvas).
  """
  b, p = shape
  n = int(max_new_tokens)
  if c.mask_token_id is None:
    raise ValueError("config.mask_token_id is None: the sampler needs the mask token id")
  infill = prompt_masks is not None and bool(np.any(np.asarray(prompt_masks) > 0))
  if n < (0 if infill else 1):
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 (or >= 0 when the prompt "
                     "holds mask tokens to fill)")
  c.check_positions(p + n, f"a {p}-token prompt + max_new_tokens={max_new_tokens}")
  check_options(alg, temperature, top_p, top_k, alg_temp, threshold, cache, cache_refresh_every,
                cfg_scale)
  if infill and (block_length is not None or cache is not None):
    raise ValueError(f"the prompt holds mask tokens (infilling), which runs without blocks "
                     f"or a block cache: got block_length={block_length}, cache={cache!r}")
  end_ids = tuple(sorted({int(i) for i in (end_token_ids or ()) if i is not None} or
                         {int(i) for i in (c.eos_token_id,) if i is not None}))
  if logits_eos_inf and c.eos_token_id is None:
    raise ValueError("logits_eos_inf needs config.eos_token_id")
  if (confidence_eos_eot_inf or early_stop) and not end_ids:
    raise ValueError("confidence_eos_eot_inf / early_stop need end_token_ids (or "
                     "config.eos_token_id)")
  fill_id = c.pad_token_id if c.pad_token_id is not None else end_ids[0] if end_ids else 0
  sample = temperature > 0
  use_alg_temp = alg_temp is not None and alg_temp > 0
  needs_rng = sample or use_alg_temp or alg in ("origin", "random")
  if needs_rng and rng is None:
    raise ValueError(f"rng is None but alg={alg!r}, temperature={temperature}, "
                     f"alg_temp={alg_temp} sample at random: pass rng=jax.random.key(seed)")
  if rng is None:
    rng = jax.random.key(0)
  if infill:  # one block over the whole canvas; Dream's counts from every row's masks
    sched = build_schedule(p + n, steps, eps=eps, threshold=threshold,
                           num_masked_per_row=np.asarray(prompt_masks) + n)
  else:
    sched = build_schedule(n, steps, block_length=block_length, eps=eps, threshold=threshold,
                           cache_refresh_every=cache_refresh_every)
  if mesh is not None:
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if b % shards:
      raise ValueError(f"prompt_ids_BxP has batch {b}, not divisible by the mesh's data x fsdp "
                       f"size {shards}")

  static = Static(
      config=c, alg=alg, sample=sample, use_top_p=top_p is not None and top_p < 1,
      top_k=None if top_k is None else int(top_k), use_alg_temp=use_alg_temp,
      threshold_mode=threshold is not None, cache=cache, refresh_every=int(cache_refresh_every),
      prompt_len=p, max_new_tokens=n, block_length=sched.block_length,
      num_blocks=sched.num_blocks, num_steps=sched.num_steps, return_history=return_history,
      mesh=mesh, infill=infill, use_cfg=cfg_scale > 0, logits_eos_inf=bool(logits_eos_inf),
      confidence_eos_eot_inf=bool(confidence_eos_eot_inf), early_stop=bool(early_stop),
      end_ids=end_ids if (confidence_eos_eot_inf or early_stop) else (), fill_id=int(fill_id))
  # Host numpy (replicated on every device / process): values, not compile-time constants.
  scalars = np.asarray([temperature if sample else 1.0, top_p if top_p is not None else 1.0,
                        alg_temp if use_alg_temp else 1.0,
                        threshold if threshold is not None else 1.0, cfg_scale], np.float32)
  arrays = (sched.block_of_step, sched.reveal_count, sched.transfer_prob, sched.refresh)
  return static, arrays, scalars, rng
