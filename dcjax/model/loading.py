"""The model a job runs: a Hugging Face checkpoint or a sharded random init (docs/model.md)."""

from __future__ import annotations

import dataclasses

import jax

from dcjax.model import hf
from dcjax.model.config import RUNTIME_FIELDS, ModelConfig
from dcjax.model.params import init_params


def model_config_of(config) -> ModelConfig:
  """The ModelConfig of a full job config (`config.model`), validated."""
  try:
    model_config = ModelConfig.from_dict(config.model.to_dict())
  except TypeError as e:  # a missing required field
    raise ValueError(f"config.model is incomplete: {e}") from None
  model_config.validate("config.model")
  return model_config


def load_or_init(config, mesh, *, restoring: bool = False, source=None):
  """(ModelConfig, params; None when `restoring`, since the checkpoint brings them).

  With `source` (a previous run's orbax checkpoint: `dcjax.train.handoff.Source`, from
  `config.init_from` / `config.checkpoint_dir`; the mode runners open it and pass it in), its
  saved model config and params; with `config.hf_dir`, the checkpoint's config.json and
  weights (placed straight into their shards on `mesh`) in `config.model.param_dtype`. Either
  way `config.model`'s runtime fields (compute dtype, remat, attention implementation) go on
  top. Otherwise `config.model` and a sharded random init from `config.seed`.
  """
  model = config.model if "model" in config else {}
  overrides = {k: model[k] for k in RUNTIME_FIELDS if k in model}
  if source is not None:
    model_config = dataclasses.replace(source.model_config, **overrides)
    return model_config, None if restoring else source.load_params(model_config, mesh)
  if config.get("hf_dir"):
    param_dtype = model.get("param_dtype", "float32")
    if restoring:
      model_config, params = hf.read_config(config.hf_dir)[0], None
      model_config = dataclasses.replace(model_config, param_dtype=param_dtype,
                                         dtype=param_dtype)
    else:
      model_config, params = hf.load_pretrained(config.hf_dir, dtype=param_dtype, mesh=mesh)
    return dataclasses.replace(model_config, **overrides), params
  model_config = model_config_of(config)
  if restoring:
    return model_config, None
  return model_config, init_params(model_config, jax.random.key(config.seed), mesh)
