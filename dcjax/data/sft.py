"""SFT examples (SPEC §2): ChatML prompt + response, padded to a fixed length with pad targets.

The prompt is everything up to and including `<|im_start|>assistant\\n`; the response is the
assistant's text, then `<|im_end|>`, then pad tokens up to `seq_len`. The prompt is never
masked; the response and the pads are (pads teach the model where to stop).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def chat_parts(record: Mapping[str, Any], tokenizer, *, messages_field: str = "messages",
               prompt_field: str = "prompt", response_field: str = "response") -> tuple[str, str]:
  """(prompt text with the generation prompt, response text) of a chat or prompt/response record."""
  if messages_field in record:
    messages = list(record[messages_field])
    if not messages or messages[-1].get("role") != "assistant":
      raise ValueError(f"SFT record's {messages_field!r} must end with an assistant turn: "
                       f"{str(record)[:200]}")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    return prompt, messages[-1]["content"]
  if prompt_field in record and response_field in record:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": record[prompt_field]}],
                                           add_generation_prompt=True)
    return prompt, record[response_field]
  raise ValueError(f"SFT record has neither {messages_field!r} nor {prompt_field!r} + "
                   f"{response_field!r} (config.data.*_field): keys {sorted(record)}")


def encode_example(prompt: str, response: str, tokenizer, seq_len: int,
                   pad_id: int) -> dict[str, np.ndarray] | None:
  """Fixed-length row, or None when the prompt alone fills `seq_len` (the example is dropped).

  A response that does not fit is cut at `seq_len` (its `<|im_end|>` is lost).
  """
  prompt_ids = tokenizer.encode(prompt)
  if len(prompt_ids) >= seq_len:
    return None
  response_ids = tokenizer.encode(response) + [tokenizer.chat_end_id]
  ids = (prompt_ids + response_ids)[:seq_len]
  tokens = np.full((seq_len,), pad_id, np.int32)
  tokens[:len(ids)] = ids
  prompt_mask = np.zeros((seq_len,), bool)
  prompt_mask[:len(prompt_ids)] = True
  return dict(tokens=tokens, segment_ids=np.ones((seq_len,), np.int32),
              positions=np.arange(seq_len, dtype=np.int32), prompt_mask=prompt_mask)


def resolve_pad_id(tokenizer, which: str) -> int:
  """`config.data.sft_pad`: "pad" (the tokenizer's pad, = eos for Base) or "dlm_pad"."""
  if which == "pad":
    return int(tokenizer.pad_id)
  if which == "dlm_pad":
    pad = tokenizer.token_to_id("<|dlm_pad|>")
    if pad is None:
      raise ValueError("config.data.sft_pad='dlm_pad' but the tokenizer has no <|dlm_pad|> token")
    return int(pad)
  raise ValueError(f"config.data.sft_pad={which!r} must be 'pad' or 'dlm_pad'")
