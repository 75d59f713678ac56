"""Texts with `<|mask|>` spans <-> sampler canvases, for infilling (docs/sampler.md, "Infilling").

The sampler fills every mask token of its canvas, wherever it is (`generate`). These host
helpers build such canvases from text and read the filled text back:

* `infill_text(prefix, suffix, length)`: `prefix + "<|mask|>" * length + suffix`;
* `encode_with_masks(tokenizer, text)`: ids with exactly one mask id per `<|mask|>` (the
  text around each mask is encoded on its own, so no merge crosses a mask);
* `encode_canvases(tokenizer, texts)`: left-padded [B, P] ids and keep-mask, as
  `decode.encode_left_padded` but through `encode_with_masks`;
* `filled_texts(tokenizer, tokens_BxL, keep_BxL)`: each row's real tokens decoded, i.e. the
  input text with its masks replaced by what the sampler put there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dcjax.data.tokenizer import MASK, Tokenizer


def infill_text(prefix: str, suffix: str, length: int) -> str:
  """The text whose `length` masks between `prefix` and `suffix` the sampler fills."""
  if length < 0:
    raise ValueError(f"length={length} must be >= 0")
  return prefix + MASK * int(length) + suffix


def has_masks(text: str) -> bool:
  return MASK in text


def encode_with_masks(tokenizer: Tokenizer, text: str) -> list[int]:
  """Token ids of `text` with `tokenizer.mask_id` for each `<|mask|>`."""
  pieces = text.split(MASK)
  ids = list(tokenizer.encode(pieces[0])) if pieces[0] else []
  for piece in pieces[1:]:
    ids.append(int(tokenizer.mask_id))
    if piece:
      ids.extend(tokenizer.encode(piece))
  return ids


def encode_canvases(tokenizer: Tokenizer, texts: Sequence[str], *, length: int | None = None,
                    pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [B, P], keep bool [B, P]): each text through `encode_with_masks`, left-padded
  to the longest (or to `length`, keeping each text's last `length` tokens)."""
  if not texts:
    raise ValueError("texts is empty: need at least one text")
  encoded = [encode_with_masks(tokenizer, t) for t in texts]
  length = max(len(e) for e in encoded) if length is None else int(length)
  if length < 1:
    raise ValueError(f"length={length} must be >= 1 (the texts are empty)")
  ids = np.full((len(texts), length), tokenizer.pad_id if pad_id is None else pad_id, np.int32)
  keep = np.zeros((len(texts), length), bool)
  for row, e in enumerate(encoded):
    e = e[len(e) - length:] if len(e) > length else e
    if e:
      ids[row, length - len(e):] = e
      keep[row, length - len(e):] = True
  return ids, keep


def filled_texts(tokenizer: Tokenizer, tokens_BxL, keep_BxL, *,
                 skip_special_tokens: bool = False) -> list[str]:
  """Each row's real tokens (left padding dropped) decoded: the filled canvas as text."""
  tokens, keep = np.asarray(tokens_BxL), np.asarray(keep_BxL, bool)
  return [tokenizer.decode(row[k], skip_special_tokens=skip_special_tokens)
          for row, k in zip(tokens, keep)]
