"""The Dream / DiffuCoder model: `apply(config, params, tokens)` -> unshifted logits."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax

from dcjax.model.config import ModelConfig
from dcjax.model.transformer import Transformer, mask_and_positions
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

  `attention_mask` is None (all visible), a [B, L] keep-mask for left-padded rows, or a
  [B, L, L] boolean mask. Positions default to SPEC §1's rule. Activation sharding
  constraints take effect under `jax.set_mesh(mesh)`.
  """
  return _apply(as_model_config(config), params, tokens_BxL, attention_mask, positions,
                rules=tuple(rules))


@functools.partial(jax.jit, static_argnames=("config", "rules"))
def _apply(config, params, tokens_BxL, attention_mask, positions, *, rules):
  # Jitted so eager callers get one compiled program; inside a caller's jit it is inlined.
  mask_BxLxL, positions_BxL = mask_and_positions(tokens_BxL, attention_mask, positions)
  with nn.logical_axis_rules(rules):
    return Transformer(config).apply({"params": params}, tokens_BxL, positions_BxL, mask_BxLxL)


__all__ = ["ModelConfig", "Transformer", "apply", "as_model_config"]
