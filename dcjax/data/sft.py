"""SFT rows (docs/losses.md): ChatML prompt + response, padded to a fixed length with pad targets.

The prompt is everything up to and including `<|im_start|>assistant\\n`; the response is the
assistant's text, then `<|im_end|>`, then pad tokens up to `seq_len`. The prompt is never
masked; the response and the pads are (pads teach the model where to stop).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def split_record(record: Mapping[str, Any], *, messages_field: str = "messages",
                 prompt_field: str = "prompt",
                 response_field: str = "response") -> tuple[list[dict], str]:
  """(the chat turns before the answer, the answer text) of a chat or prompt/response record.

  Raises ValueError naming the field (config.data.*_field) that is missing or malformed.
  """
  if messages_field in record:
    messages = record[messages_field]
    if not isinstance(messages, list) or not messages:
      raise ValueError(f"{messages_field!r} (config.data.messages_field) must be a non-empty "
                       f"list of turns, not {str(messages)[:100]}")
    for i, turn in enumerate(messages):
      if not (isinstance(turn, dict) and "role" in turn and isinstance(turn.get("content"), str)):
        raise ValueError(f"{messages_field!r} turn {i} needs a 'role' and a string 'content': "
                         f"{str(turn)[:100]}")
    if messages[-1]["role"] != "assistant":
      raise ValueError(f"{messages_field!r} (config.data.messages_field) must end with an "
                       f"assistant turn, not {messages[-1]['role']!r}")
    return list(messages[:-1]), messages[-1]["content"]
  if prompt_field in record and response_field in record:
    prompt, response = record[prompt_field], record[response_field]
    if not isinstance(prompt, str) or not isinstance(response, str):
      raise ValueError(f"{prompt_field!r} and {response_field!r} (config.data.prompt_field / "
                       "response_field) must hold strings")
    return [{"role": "user", "content": prompt}], response
  raise ValueError(f"SFT record has neither {messages_field!r} nor {prompt_field!r} + "
                   f"{response_field!r} (config.data.*_field): keys {sorted(record)}")


def chat_parts(record: Mapping[str, Any], tokenizer, *, messages_field: str = "messages",
               prompt_field: str = "prompt", response_field: str = "response") -> tuple[str, str]:
  """(prompt text with the generation prompt, response text) of a chat or prompt/response record."""
  turns, response = split_record(record, messages_field=messages_field,
                                 prompt_field=prompt_field, response_field=response_field)
  return tokenizer.apply_chat_template(turns, add_generation_prompt=True), response


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
