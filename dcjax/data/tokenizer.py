"""One tokenizer interface over two backends.

* `HFTokenizer`: a Hugging Face `tokenizer.json` + `tokenizer_config.json` directory (the
  released Dream / DiffuCoder / Qwen2 checkpoints) through the `tokenizers` package.
* `SentencePieceTokenizer`: a sentencepiece model trained here (`train_sentencepiece`) with
  the special tokens reserved at fixed ids and byte fallback, so any text round-trips.

Both expose `encode`, `decode`, the special ids (`mask_id`, `pad_id`, `eos_id`,
`chat_end_id`, `im_start_id`) and the ChatML chat template.
"""

from __future__ import annotations

import abc
import io
import json
import os
from typing import Iterable, Mapping, Sequence

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MASK, EOS, IM_START, IM_END, DLM_PAD = (
    "<|mask|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|dlm_pad|>")
# Sentencepiece layout: <unk> is 0, then these at ids 1..5 in order.
SP_RESERVED_TOKENS = (EOS, IM_START, IM_END, MASK, DLM_PAD)


class Tokenizer(abc.ABC):
  """encode/decode plus the special ids and chat template every dcjax job needs."""

  mask_id: int
  pad_id: int
  eos_id: int
  chat_end_id: int
  im_start_id: int

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids (the model's embedding rows must be at least this)."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Text -> ids; special-token strings in the text map to their ids."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Ids -> text."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """The id of a token string, or None."""

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset({self.mask_id, self.pad_id, self.eos_id, self.chat_end_id, self.im_start_id})

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True,
                          system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per turn, the default system
    prompt first when the messages have none, and an open assistant turn at the end."""
    for message in messages:
      if "role" not in message or "content" not in message:
        raise ValueError(f"chat message {message!r} needs 'role' and 'content' keys")
    parts = []
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
      parts.append(f"{IM_START}system\n{system_prompt}{IM_END}\n")
    for message in messages:
      parts.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n")
    if add_generation_prompt:
      parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


class HFTokenizer(Tokenizer):
  """A released checkpoint's byte-level BPE tokenizer directory."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _Tok  # pylint: disable=import-outside-toplevel
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
      raise FileNotFoundError(f"{tok_file} not found: a Hugging Face tokenizer directory needs "
                              "tokenizer.json (and tokenizer_config.json)")
    self._tok = _Tok.from_file(tok_file)
    self.path = path  # what a checkpoint records (dcjax.train.handoff)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    cfg = {}
    if os.path.exists(cfg_file):
      with open(cfg_file) as f:
        cfg = json.load(f)

    def special(key: str, default: str) -> int:
      value = cfg.get(key) or default
      if isinstance(value, dict):  # {"content": "<|...|>", ...}
        value = value["content"]
      token_id = self._tok.token_to_id(value)
      if token_id is None:
        raise ValueError(f"{cfg_file}: {key}={value!r} is not in the vocabulary of {tok_file}")
      return token_id

    self.eos_id = special("eos_token", EOS)
    self.pad_id = special("pad_token", EOS)
    self.mask_id = special("mask_token", MASK)
    self.chat_end_id = special("chat_end_token", IM_END)
    self.im_start_id = special("im_start_token", IM_START)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model whose special tokens sit at the fixed ids of SP_RESERVED_TOKENS."""

  def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.path = model_path  # what a checkpoint records (dcjax.train.handoff)
    if model_proto is None:
      if model_path is None or not os.path.exists(model_path):
        raise FileNotFoundError(f"sentencepiece model {model_path!r} not found")
      with open(model_path, "rb") as f:
        model_proto = f.read()
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._special = {}
    for token in SP_RESERVED_TOKENS:
      token_id = self._sp.piece_to_id(token)
      if self._sp.id_to_piece(token_id) != token:
        raise ValueError(f"sentencepiece model {model_path or '<proto>'} lacks the special token "
                         f"{token!r}; train it with dcjax.data.tokenizer.train_sentencepiece")
      self._special[token] = token_id
    self.eos_id = self.pad_id = self._special[EOS]
    self.mask_id = self._special[MASK]
    self.chat_end_id = self._special[IM_END]
    self.im_start_id = self._special[IM_START]
    self.dlm_pad_id = self._special[DLM_PAD]

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    # user_defined_symbols are matched inside the text, so special strings map to their ids.
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      special = set(self._special.values())
      ids = [i for i in ids if i not in special]
    return self._sp.decode(ids)

  def token_to_id(self, token: str) -> int | None:
    token_id = self._sp.piece_to_id(token)
    return token_id if self._sp.id_to_piece(token_id) == token else None


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_path: str, *,
                        model_type: str = "bpe", character_coverage: float = 1.0,
                        max_sentence_length: int = 16384,
                        input_sentence_size: int = 2_000_000) -> SentencePieceTokenizer:
  """Trains a sentencepiece model on `texts` and writes it to `model_path`.

  Ids: 0 <unk>, then SP_RESERVED_TOKENS at 1..5; byte fallback keeps every string
  encodable; whitespace is kept verbatim (code needs its indentation).
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  minimum = len(SP_RESERVED_TOKENS) + 1 + 256  # specials, <unk>, byte pieces
  if vocab_size <= minimum:
    raise ValueError(f"vocab_size={vocab_size} must exceed {minimum} (special tokens + 256 bytes)")
  lines = (line for text in texts for line in text.splitlines() if line.strip())
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_writer=proto, vocab_size=vocab_size,
      model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
      unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
      user_defined_symbols=list(SP_RESERVED_TOKENS), split_digits=True,
      remove_extra_whitespaces=False, normalization_rule_name="identity",
      allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_length,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
      minloglevel=2, num_threads=os.cpu_count() or 1)
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  with open(model_path, "wb") as f:
    f.write(proto.getvalue())
  return SentencePieceTokenizer(model_path)


SP_IN_DIR = "tokenizer.model"  # a sentencepiece model in a checkpoint directory (mode=export)


def load_tokenizer(path: str) -> Tokenizer:
  """A sentencepiece `.model` file, a Hugging Face directory with tokenizer.json, or a
  directory with only a sentencepiece `tokenizer.model` (what mode=export writes for one).
  A gs:// one is copied to local disk first (`dcjax.workdir.local_copy`)."""
  from dcjax import workdir  # pylint: disable=import-outside-toplevel
  path = workdir.local_copy(path)
  if os.path.isdir(path):
    sp_file = os.path.join(path, SP_IN_DIR)
    if not os.path.exists(os.path.join(path, "tokenizer.json")) and os.path.exists(sp_file):
      return SentencePieceTokenizer(sp_file)
    return HFTokenizer(path)
  if os.path.isfile(path):
    return SentencePieceTokenizer(path)
  raise FileNotFoundError(f"tokenizer path {path!r} is neither a sentencepiece .model file nor a "
                          "directory with tokenizer.json")
