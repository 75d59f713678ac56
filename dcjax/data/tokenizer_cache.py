"""The tokenizer a training run uses: a given file, the checkpoint's, or one trained and cached.

Order: `config.data.tokenizer` (a .model file or HF directory), else `config.hf_dir`'s
tokenizer, else the tokenizer of the `config.init_from` run (passed in as `init_from_path`), else a sentencepiece model trained on the training documents and cached at
`<workdir>/tokenizer/sp<vocab>.model`. On several hosts process 0 trains it and the others read
it through the workdir, which must then be shared (a gs:// bucket or a shared filesystem).
"""

from __future__ import annotations

import time

from dcjax import workdir as workdir_lib
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


def get_tokenizer(config, workdir: str, train_docs=None, log=print,
                  init_from_path: str | None = None):
  """Loads or trains the run's tokenizer (see the module docstring)."""
  data = config.data
  if data.get("tokenizer"):
    return tokenizer_lib.load_tokenizer(data.tokenizer)
  if config.get("hf_dir"):
    return tokenizer_lib.load_tokenizer(config.hf_dir)
  if init_from_path:
    return tokenizer_lib.load_tokenizer(init_from_path)
  vocab = int(data.get("tokenizer_vocab_size") or config.model.vocab_size)
  if train_docs is None:
    raise ValueError("config.data.tokenizer is empty and no documents were given to train one")
  if data.kind != "pretrain":
    raise ValueError("config.data.tokenizer must be set for config.data.kind='sft'")

  def train(path):
    start = time.perf_counter()
    texts = training_texts(train_docs, data.text_field,
                           int(data.get("tokenizer_train_chars", 4_000_000)))
    tokenizer_lib.train_sentencepiece(texts, vocab, path)
    log(f"tokenizer: trained sentencepiece ({vocab} pieces) in "
        f"{time.perf_counter() - start:.1f}s -> {path}")

  trained = []
  wd = workdir_lib.resolve(workdir)
  path = wd.shared_file(f"tokenizer/sp{vocab}.model", lambda p: trained.append(train(p)))
  if not trained:
    log(f"tokenizer: cached {path}")
  return tokenizer_lib.load_tokenizer(path)


def check_against_model(tok, model_config) -> None:
  """The tokenizer must fit the embedding and agree on the special ids the loss uses."""
  if tok.vocab_size > model_config.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids but config.model.vocab_size="
                     f"{model_config.vocab_size} embedding rows")
  if model_config.mask_token_id is not None and model_config.mask_token_id != tok.mask_id:
    raise ValueError(f"config.model.mask_token_id={model_config.mask_token_id} but the "
                     f"tokenizer's <|mask|> is {tok.mask_id}")
