"""Host-side helpers around the sampler: prompts in, completions out (never inside jit).

* `encode_left_padded`: texts -> left-padded [B, P] ids and keep-mask for `generate`.
* `chat_prompt`: the ChatML prompt of one user turn (optionally prefilling the assistant).
* `cut_at_stop` / `decode_completions`: completions cut at the first eos / `<|im_end|>` /
  pad / `<|dlm_pad|>`, as Instruct outputs are read (docs/sampler.md).
* `ByteTokenizer`: a file-free byte-level tokenizer with the special tokens, so the sample
  mode runs without a checkpoint.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from dcjax.data.tokenizer import (DEFAULT_SYSTEM_PROMPT, DLM_PAD, EOS, IM_END, IM_START, MASK,
                                  Tokenizer)


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes are ids 0..255; then <|endoftext|> (eos and pad), <|im_start|>,
  <|im_end|>, <|mask|>, <|dlm_pad|>."""

  RESERVED_TOKENS = (EOS, IM_START, IM_END, MASK, DLM_PAD)

  def __init__(self):
    self._special_ids = {tok: 256 + i for i, tok in enumerate(self.RESERVED_TOKENS)}
    self._special_tokens = {i: tok for tok, i in self._special_ids.items()}
    self._split = re.compile("(" + "|".join(re.escape(t) for t in self.RESERVED_TOKENS) + ")")
    self.eos_id = self.pad_id = self._special_ids[EOS]
    self.im_start_id = self._special_ids[IM_START]
    self.chat_end_id = self._special_ids[IM_END]
    self.mask_id = self._special_ids[MASK]

  @property
  def vocab_size(self) -> int:
    return 256 + len(self.RESERVED_TOKENS)

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for piece in self._split.split(text):
      if piece in self._special_ids:
        ids.append(self._special_ids[piece])
      elif piece:
        ids.extend(piece.encode("utf-8"))
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    out, buffer = [], bytearray()
    for i in (int(x) for x in ids):
      if i < 256:
        buffer.append(i)
        continue
      out.append(buffer.decode("utf-8", errors="replace"))
      buffer = bytearray()
      if not skip_special_tokens:
        out.append(self._special_tokens.get(i, f"<|{i}|>"))
    out.append(buffer.decode("utf-8", errors="replace"))
    return "".join(out)

  def token_to_id(self, token: str) -> int | None:
    if len(token.encode("utf-8")) == 1:
      return token.encode("utf-8")[0]
    return self._special_ids.get(token)


def stop_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """eos, pad, `<|im_end|>` and (when the vocabulary has it) `<|dlm_pad|>`."""
  ids = [tokenizer.eos_id, tokenizer.pad_id, tokenizer.chat_end_id,
         tokenizer.token_to_id(DLM_PAD)]
  return tuple(sorted({int(i) for i in ids if i is not None}))


def cut_at_stop(ids: Iterable[int], stop_ids: Iterable[int], include_stop: bool = False
                ) -> list[int]:
  """The ids before the first stop id (with it when `include_stop`)."""
  stops = set(int(i) for i in stop_ids)
  out = []
  for i in ids:
    if int(i) in stops:
      if include_stop:
        out.append(int(i))
      break
    out.append(int(i))
  return out


def decode_completions(tokenizer: Tokenizer, tokens_BxL, prompt_len: int, *,
                       stop_ids: Iterable[int] | None = None,
                       skip_special_tokens: bool = True) -> list[str]:
  """The text of each row's completion (positions >= prompt_len), cut at the first stop."""
  stops = stop_token_ids(tokenizer) if stop_ids is None else tuple(stop_ids)
  rows = np.asarray(tokens_BxL)[:, prompt_len:]
  return [tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=skip_special_tokens)
          for row in rows]


def chat_prompt(tokenizer: Tokenizer, user: str, *,
                system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                assistant_prefix: str = "", history: Sequence[Mapping[str, str]] = ()) -> str:
  """ChatML for `history` + one user turn, with the assistant turn opened (and prefilled
  with `assistant_prefix`, e.g. docs/evaluation.md's "Here is the code to solve this problem:")."""
  messages = list(history) + [{"role": "user", "content": user}]
  return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                       system_prompt=system_prompt) + assistant_prefix


def encode_left_padded(tokenizer: Tokenizer, texts: Sequence[str], *, length: int | None = None,
                       pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [B, P], keep bool [B, P]): left padding to the longest text (or `length`,
  keeping each text's last `length` tokens when it is longer)."""
  if not texts:
    raise ValueError("texts is empty: need at least one prompt")
  encoded = [tokenizer.encode(t) for t in texts]
  if length is None:
    length = max(len(e) for e in encoded)
  if length < 1:
    raise ValueError(f"length={length} must be >= 1 (the prompts are empty)")
  pad = tokenizer.pad_id if pad_id is None else pad_id
  ids = np.full((len(texts), length), pad, np.int32)
  keep = np.zeros((len(texts), length), bool)
  for row, e in enumerate(encoded):
    e = e[-length:]
    if e:
      ids[row, length - len(e):] = e
      keep[row, length - len(e):] = True
  return ids, keep
