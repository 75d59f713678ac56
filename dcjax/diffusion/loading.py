"""A model and its tokenizer for sampling: a Hugging Face checkpoint directory, or a random
model from `config.model` with the byte-level fallback tokenizer."""

from __future__ import annotations

import dataclasses

from dcjax.config import ConfigError
from dcjax.data.tokenizer import load_tokenizer
from dcjax.diffusion import decode
from dcjax.model import loading


def load_model_and_tokenizer(config, mesh):
  """(ModelConfig, params, tokenizer); the model's mask id is the tokenizer's."""
  if config.get("hf_dir"):
    tokenizer = load_tokenizer(config.get("tokenizer_path") or config.hf_dir)
  else:
    tokenizer = decode.ByteTokenizer()
    vocab = loading.model_config_of(config).vocab_size
    if vocab < tokenizer.vocab_size:
      raise ConfigError(f"config.model.vocab_size={vocab} is smaller than the byte "
                        f"tokenizer's {tokenizer.vocab_size}")
  model_config, params = loading.load_or_init(config, mesh)
  if model_config.mask_token_id != tokenizer.mask_id:
    model_config = dataclasses.replace(model_config, mask_token_id=tokenizer.mask_id)
  return model_config, params, tokenizer
