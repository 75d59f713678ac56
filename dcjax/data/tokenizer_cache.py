"""The tokenizer a training run uses: a given file, the checkpoint's, or one trained and cached.

Order: `config.data.tokenizer` (a .model file or HF directory), else `config.hf_dir`'s
tokenizer, else a sentencepiece model trained on the training documents and cached at
`<workdir>/tokenizer/sp<vocab>.model` (single host only: hosts do not share a local disk).
"""

from __future__ import annotations

import os
import time

import jax

from dcjax.data import tokenizer as tokenizer_lib


def training_texts(docs, text_field: str, max_chars: int):
  """Documents in their stored order until about `max_chars` characters."""
  total = 0
  for index in range(len(docs)):
    text = docs[index][text_field]
    yield text
    total += len(text)
    if total >= max_chars:
      return


def get_tokenizer(config, workdir: str, train_docs=None, log=print):
  """Loads or trains the run's tokenizer (see the module docstring)."""
  data = config.data
  if data.get("tokenizer"):
    return tokenizer_lib.load_tokenizer(data.tokenizer)
  if config.get("hf_dir"):
    return tokenizer_lib.load_tokenizer(config.hf_dir)
  vocab = int(data.get("tokenizer_vocab_size") or config.model.vocab_size)
  path = os.path.join(workdir, "tokenizer", f"sp{vocab}.model")
  if os.path.exists(path):
    log(f"tokenizer: cached {path}")
    return tokenizer_lib.load_tokenizer(path)
  if jax.process_count() > 1:
    raise ValueError("config.data.tokenizer is empty and config.hf_dir is unset: training a "
                     "tokenizer in the workdir works on one host only; set config.data.tokenizer")
  if train_docs is None:
    raise ValueError("config.data.tokenizer is empty and no documents were given to train one")
  if data.kind != "pretrain":
    raise ValueError("config.data.tokenizer must be set for config.data.kind='sft'")
  start = time.perf_counter()
  texts = training_texts(train_docs, data.text_field,
                         int(data.get("tokenizer_train_chars", 4_000_000)))
  tok = tokenizer_lib.train_sentencepiece(texts, vocab, path)
  log(f"tokenizer: trained sentencepiece ({vocab} pieces) in "
      f"{time.perf_counter() - start:.1f}s -> {path}")
  return tok


def check_against_model(tok, model_config) -> None:
  """The tokenizer must fit the embedding and agree on the special ids the loss uses."""
  if tok.vocab_size > model_config.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids but config.model.vocab_size="
                     f"{model_config.vocab_size} embedding rows")
  if model_config.mask_token_id is not None and model_config.mask_token_id != tok.mask_id:
    raise ValueError(f"config.model.mask_token_id={model_config.mask_token_id} but the "
                     f"tokenizer's <|mask|> is {tok.mask_id}")
