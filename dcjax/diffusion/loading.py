"""A model and its tokenizer for sampling: a previous run's orbax checkpoint
(`config.checkpoint_dir`, opened by the caller), a Hugging Face checkpoint directory, or a
random model from `config.model` with the byte-level fallback tokenizer."""

from __future__ import annotations

import dataclasses

from dcjax.config import ConfigError
from dcjax.data.tokenizer import load_tokenizer
from dcjax.diffusion import decode
from dcjax.model import loading


def load_model_and_tokenizer(config, mesh, source=None):
  """(ModelConfig, params, tokenizer); the model's mask id is the tokenizer's.

  `source`: `dcjax.train.handoff.Source` of `config.checkpoint_dir`, read with the tokenizer
  that run used (`config.tokenizer_path` overrides it).
  """
  if source is not None:
    path = config.get("tokenizer_path") or source.tokenizer_path
    if not path:
      raise ConfigError(f"{source.field}: checkpoint {source.where} records no tokenizer and "
                        f"its workdir has no tokenizer/sp*.model; set config.tokenizer_path")
    tokenizer = load_tokenizer(path)
  elif config.get("hf_dir"):
    tokenizer = load_tokenizer(config.get("tokenizer_path") or config.hf_dir)
  else:
    tokenizer = decode.ByteTokenizer()
    vocab = loading.model_config_of(config).vocab_size
    if vocab < tokenizer.vocab_size:
      raise ConfigError(f"config.model.vocab_size={vocab} is smaller than the byte "
                        f"tokenizer's {tokenizer.vocab_size}")
  model_config, params = loading.load_or_init(config, mesh, source=source)
  if model_config.mask_token_id != tokenizer.mask_id:
    model_config = dataclasses.replace(model_config, mask_token_id=tokenizer.mask_id)
  return model_config, params, tokenizer
