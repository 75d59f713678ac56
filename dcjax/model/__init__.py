"""The Dream / DiffuCoder model: `apply(config, params, tokens)` -> unshifted logits."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax

from dcjax.model.config import ModelConfig
from dcjax.model import head, masks
from dcjax.model.attention import KVCache
from dcjax.model.params import abstract_params, init_params, logical_specs, param_shardings
from dcjax.model.transformer import Transformer, keep_positions, mask_and_positions, pair_mask
from dcjax.parallel.rules import LOGICAL_AXIS_RULES


def as_model_config(config: Any) -> ModelConfig:
  """Accepts a ModelConfig, a mapping / ConfigDict of its fields, or a full config with `.model`."""
  if isinstance(config, ModelConfig):
    return config
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if isinstance(config, Mapping) and "model" in config and isinstance(config["model"], Mapping):
    config = config["model"]
  return ModelConfig.from_dict(config)


def apply(config, params, tokens_BxL, attention_mask=None, positions=None, *,
          rules=LOGICAL_AXIS_RULES):
  """Runs the model; returns unshifted logits [B, L, V] in the compute dtype.

  `attention_mask` is None (all visible), a [B, L] keep-mask for left-padded rows,
  `masks.Segments`, or a [B, L, L] boolean mask. Positions default to Dream's rule
  (docs/model.md). Activation sharding constraints take effect under `jax.set_mesh(mesh)`.
  """
  return _apply(as_model_config(config), params, tokens_BxL, attention_mask, positions,
                rules=tuple(rules), head=True)


def hidden(config, params, tokens_BxL, attention_mask=None, positions=None, *,
           rows: tuple[int, int] | None = None, wanted=None, rules=LOGICAL_AXIS_RULES):
  """As `apply`, but returns the final-norm hidden states [B, L, D] instead of logits: the
  losses feed them to `head.token_logps`, which applies the LM head in chunks.

  `rows=(start, length)`: only those positions' states come back, [B, length, D]; with the
  layer loop (`scan_layers=False`) the last layer computes only them past its keys and
  values (docs/model.md, "Rows the head reads").

  `wanted` ([B, L] boolean, or [B, length] with `rows`): the positions whose states the
  caller reads; the others come back as zeros, and with the layer loop the last layer's
  residual, norm and MLP run on the wanted positions only (`dcjax.model.wanted`)."""
  return _apply(as_model_config(config), params, tokens_BxL, attention_mask, positions,
                rules=tuple(rules), head=False, rows=rows, wanted=wanted)


@functools.partial(jax.jit, static_argnames=("config", "rules", "head", "rows"))
def _apply(config, params, tokens_BxL, attention_mask, positions, *, rules, head, rows=None,
           wanted=None):
  # Jitted so eager callers get one compiled program; inside a caller's jit it is inlined.
  mask, positions_BxL = mask_and_positions(tokens_BxL, attention_mask, positions)
  start, length = (0, None) if rows is None else rows
  with nn.logical_axis_rules(rules):
    return Transformer(config, head=head).apply({"params": params}, tokens_BxL, positions_BxL,
                                                mask, None, 0, start, length, True,
                                                wanted)[1]


def forward(config: ModelConfig, params, tokens_BxW, positions_BxW, mask_BxWxS, *,
            cache: KVCache | None = None, cache_start=0, collect_kv: bool = False,
            logits_start=0, logits_length: int | None = None, rules=LOGICAL_AXIS_RULES):
  """The model with its KV-cache options, for callers inside their own jit (the sampler):
  returns (KVCache [NL, B, S, K, Dh] or None, logits). See `Transformer`."""
  with nn.logical_axis_rules(tuple(rules)):
    return Transformer(config, collect_kv).apply(
        {"params": params}, tokens_BxW, positions_BxW, mask_BxWxS, cache, cache_start,
        logits_start, logits_length)


__all__ = ["KVCache", "ModelConfig", "Transformer", "abstract_params", "apply",
           "as_model_config", "forward", "head", "hidden", "init_params", "keep_positions",
           "logical_specs", "masks", "pair_mask", "param_shardings"]
