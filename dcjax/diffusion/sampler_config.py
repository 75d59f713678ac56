"""`config.sampler`: the one section builder, validator and `generate` mapping, shared by the
sample, eval and grpo modes (docs/sampler.md).

Every field keeps its type so that any of them can be set from the command line; "off" is
written as a sentinel, never as None:

  top_p=1.0  top_k=0  alg_temp=0.0  block_length=0  threshold=0.0  cache=""  cfg_scale=0.0
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dcjax.config import ConfigError
from dcjax.diffusion.sampler_inputs import CACHE_MODES
from dcjax.diffusion.schedule import ALGS


def sampler_section(**overrides) -> ml_collections.ConfigDict:
  """`config.sampler` with every `generate` option; Dream's defaults, then `overrides`."""
  section = ml_collections.ConfigDict(dict(
      max_new_tokens=64,
      steps=64,
      alg="entropy",             # origin | maskgit_plus | topk_margin | entropy | random
      temperature=0.2,           # 0: greedy proposals
      top_p=1.0,                 # < 1 filters, e.g. 0.95
      top_k=0,                   # > 0 filters
      alg_temp=0.0,              # > 0 samples the revealed positions
      eps=1e-3,
      block_length=0,            # LLaDA blocks, e.g. 32 (0: one block)
      threshold=0.0,             # Fast-dLLM confidence threshold, e.g. 0.9 (0: off)
      cache="",                  # Fast-dLLM block cache: prefix | dual
      cache_refresh_every=0,     # 0: recompute the canvas once per block
      cfg_scale=0.0,             # LLaDA classifier-free guidance, e.g. 1.0 (0: off)
      logits_eos_inf=False,      # LLaDA: the EOS logit is -inf
      confidence_eos_eot_inf=False,  # LLaDA / Fast-dLLM: end-token proposals revealed last
      early_stop=False,          # a row stops once its completion ends; the loop when all have
  ))
  unknown = sorted(set(overrides) - set(section.keys()))
  if unknown:
    raise ConfigError(f"config.sampler has no fields {unknown}; known: {sorted(section.keys())}")
  section.update(overrides)
  return section


def _field(section: Any, name: str, where: str, kind) -> Any:
  if name not in section:
    raise ConfigError(f"{where}.{name} is missing (see dcjax/diffusion/sampler_config.py)")
  value = section[name]
  if isinstance(value, bool) or not isinstance(value, kind):
    raise ConfigError(f"{where}.{name}={value!r} must be of type "
                      f"{getattr(kind, '__name__', kind)}")
  return value


def validate_sampler(section: Any, where: str = "config.sampler") -> None:
  """Raises ConfigError naming the first bad field of a sampler section."""
  if section is None:
    raise ConfigError(f"{where} is missing")
  number = (int, float)
  for name in ("max_new_tokens", "steps"):
    if _field(section, name, where, int) < 1:
      raise ConfigError(f"{where}.{name}={section[name]} must be a positive integer")
  if _field(section, "alg", where, str) not in ALGS:
    raise ConfigError(f"{where}.alg={section.alg!r} is not one of {ALGS}")
  for name in ("logits_eos_inf", "confidence_eos_eot_inf", "early_stop"):
    if name in section and not isinstance(section[name], bool):
      raise ConfigError(f"{where}.{name}={section[name]!r} must be True or False")
  for name in ("temperature", "alg_temp", "eps") + (("cfg_scale",) if "cfg_scale" in section
                                                     else ()):
    if _field(section, name, where, number) < 0:
      raise ConfigError(f"{where}.{name}={section[name]} must be >= 0")
  if not 0 < _field(section, "top_p", where, number) <= 1:
    raise ConfigError(f"{where}.top_p={section.top_p} must be in (0, 1] (1: off)")
  for name in ("top_k", "block_length", "cache_refresh_every"):
    if _field(section, name, where, int) < 0:
      raise ConfigError(f"{where}.{name}={section[name]} must be >= 0 (0: off)")
  if not 0 <= _field(section, "threshold", where, number) <= 1:
    raise ConfigError(f"{where}.threshold={section.threshold} must be in [0, 1] (0: off)")
  if (_field(section, "cache", where, str) or None) not in CACHE_MODES:
    raise ConfigError(f"{where}.cache={section.cache!r} is not one of "
                      f"{tuple(m or '' for m in CACHE_MODES)}")
  bl = section.block_length
  if bl and section.max_new_tokens % bl:
    raise ConfigError(f"{where}.block_length={bl} must divide {where}.max_new_tokens="
                      f"{section.max_new_tokens}")
  num_blocks = section.max_new_tokens // bl if bl else 1
  if not section.threshold and section.steps % num_blocks:
    raise ConfigError(f"{where}.steps={section.steps} must be a multiple of the number of "
                      f"blocks ({num_blocks})")
  if section.threshold and section.alg == "origin":
    raise ConfigError(f"{where}.threshold needs a confidence alg, not 'origin'")
  if section.get("cfg_scale", 0) and section.cache:
    raise ConfigError(f"{where}.cfg_scale={section.cfg_scale} needs {where}.cache='' (the "
                      "unconditional pass has no cache)")


def sampler_kwargs(section: Any) -> dict:
  """`generate` keyword arguments from a validated section (sentinels become None)."""
  s = section
  return dict(
      max_new_tokens=int(s.max_new_tokens), steps=int(s.steps), alg=str(s.alg),
      temperature=float(s.temperature), top_p=float(s.top_p) if s.top_p < 1 else None,
      top_k=int(s.top_k) or None, alg_temp=float(s.alg_temp) or None, eps=float(s.eps),
      block_length=int(s.block_length) or None, threshold=float(s.threshold) or None,
      cache=str(s.cache) or None, cache_refresh_every=int(s.cache_refresh_every),
      # Sections written before these options existed (older run records) read as "off".
      cfg_scale=float(s.get("cfg_scale", 0.0)), logits_eos_inf=bool(s.get("logits_eos_inf")),
      confidence_eos_eot_inf=bool(s.get("confidence_eos_eot_inf")),
      early_stop=bool(s.get("early_stop")))
