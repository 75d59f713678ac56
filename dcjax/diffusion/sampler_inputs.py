"""Checks of `generate`'s inputs: the prompt batch and the sampler options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dcjax.diffusion.schedule import ALGS

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


def check_options(alg, temperature, top_p, top_k, alg_temp, threshold, cache, refresh_every):
  """Raises ValueError naming the first sampler option out of its range."""
  if alg not in ALGS:
    raise ValueError(f"alg={alg!r} is not one of {ALGS}")
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
