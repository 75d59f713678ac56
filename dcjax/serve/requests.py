"""OpenAI request bodies -> prompt texts + sampler `Options`; a `RequestError` (HTTP 4xx,
naming the field) for anything else (docs/serving.md).

`parse_completion` reads a `/v1/completions` body, `parse_chat` a `/v1/chat/completions`
body (the messages go through the tokenizer's ChatML template). Both accept the dcjax
sampler fields as top-level extras (the openai client's `extra_body`): `steps`, `alg`,
`block_length`, `threshold`, `cache`, `cache_refresh_every`, `top_k`, `alg_temp`,
`cfg_scale`, `logits_eos_inf`, `confidence_eos_eot_inf`, `early_stop`. Every other unknown
field is a 400 that names it.

Infilling (completions only): prompts holding `<|mask|>` are filled in place and answered
with the whole filled text; a `suffix` (with the dcjax extra `length`, default `max_tokens`)
samples `prompt + "<|mask|>" * length + suffix` and is answered with the span between
(`response_text`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import ml_collections

from dcjax.config import ConfigError
from dcjax.data.tokenizer import Tokenizer
from dcjax.diffusion import canvas
from dcjax.diffusion.sampler_config import validate_sampler
from dcjax.serve.engine import Completion, Options
from dcjax.serve.settings import Settings


class RequestError(ValueError):
  """A bad request: HTTP `status` and OpenAI's error fields (`param` names the field)."""

  def __init__(self, message: str, param: str | None = None, *, status: int = 400,
               code: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.message, self.param, self.status, self.code, self.kind = (
        message, param, status, code, kind)

  def to_json(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Request:
  """One parsed request: `prompts` (template applied) each sampled `n` times."""

  prompts: tuple[str, ...]
  n: int
  options: Options
  stop: tuple[str, ...] = ()
  stream: bool = False
  include_usage: bool = False
  echo: bool = False
  suffix: str | None = None  # infilling between each prompt and this, `length` masks
  length: int = 0

  @property
  def rows(self) -> list[str]:
    """The prompts as given, prompt-major x n (what `echo` and outputs show)."""
    return [p for p in self.prompts for _ in range(self.n)]

  @property
  def canvases(self) -> list[str]:
    """The texts sampled, one per row: the prompts, or with `suffix` the infill canvases."""
    if self.suffix is None:
      return self.rows
    return [canvas.infill_text(p, self.suffix, self.length) for p in self.rows]

  @property
  def infill(self) -> bool:
    return self.options.infill


SAMPLER_EXTRAS = ("steps", "alg", "block_length", "threshold", "cache", "cache_refresh_every",
                  "top_k", "alg_temp", "cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf",
                  "early_stop")
_BOOL_EXTRAS = ("logits_eos_inf", "confidence_eos_eot_inf", "early_stop")
_COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
           "stop", "seed", "user") + SAMPLER_EXTRAS
COMPLETION_FIELDS = _COMMON + ("prompt", "suffix", "length", "echo")
CHAT_FIELDS = _COMMON + ("messages", "max_completion_tokens", "assistant_prefix")
# OpenAI fields accepted only at their neutral value ("off"): anything else is a 400.
_NEUTRAL = {"logprobs": (None, 0, False), "top_logprobs": (None, 0), "best_of": (None, 1),
            "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
            "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
            "parallel_tool_calls": (None, False, True), "store": (None, False),
            "metadata": (None, {})}
_ROLES = ("system", "developer", "user", "assistant")
_MAX_STOPS = 4


def parse_completion(body: Mapping[str, Any], tokenizer: Tokenizer, defaults: Mapping[str, Any],
                     settings: Settings) -> Request:
  """A `/v1/completions` body; `defaults` is the sampler section (`config.sampler`)."""
  _check_fields(body, COMPLETION_FIELDS)
  prompt = _get(body, "prompt")
  if prompt is None:
    raise RequestError("prompt is missing: send a string or a list of strings", "prompt")
  prompts = [prompt] if isinstance(prompt, str) else prompt
  if not isinstance(prompts, list) or not prompts:
    raise RequestError(f"prompt must be a string or a non-empty list of strings, not "
                       f"{_kind(prompt)}", "prompt")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      hint = "; token-id prompts are not supported, send text" if isinstance(p, int) else ""
      raise RequestError(f"prompt[{i}] must be a string, not {_kind(p)}{hint}", "prompt")
    if not p:
      raise RequestError(f"prompt{'' if isinstance(prompt, str) else f'[{i}]'} is empty",
                         "prompt")
  masked = [canvas.has_masks(p) for p in prompts]
  if any(masked) and not all(masked):
    i = masked.index(not masked[0])
    raise RequestError(f"prompt[{i}] {'holds' if masked[i] else 'holds no'} <|mask|> and "
                       f"prompt[0] {'does' if masked[0] else 'does not'}: send infill and "
                       "completion prompts in separate requests", "prompt")
  suffix, length = _suffix(body, masked[0], settings)
  echo = _typed(body, "echo", bool, False)
  if masked[0]:  # the answer is the whole filled text: nothing to echo or cut
    for name in ("echo", "stop"):
      if _get(body, name):
        raise RequestError(f"{name} does not apply to a prompt holding <|mask|>, which is "
                           "answered with the whole filled text", name)
  return _request(body, prompts, defaults, settings, echo=echo, suffix=suffix, length=length,
                  infill=masked[0] or suffix is not None)


def parse_chat(body: Mapping[str, Any], tokenizer: Tokenizer, defaults: Mapping[str, Any],
               settings: Settings) -> Request:
  """A `/v1/chat/completions` body: the messages in ChatML with the assistant turn opened
  (and prefilled with the dcjax extra `assistant_prefix`)."""
  _check_fields(body, CHAT_FIELDS)
  messages = _get(body, "messages")
  if messages is None:
    raise RequestError("messages is missing: send a list of {role, content}", "messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError(f"messages must be a non-empty list, not {_kind(messages)}", "messages")
  turns = [{"role": role, "content": content}
           for role, content in (_message(m, i) for i, m in enumerate(messages))]
  if "max_completion_tokens" in body and _get(body, "max_tokens") is not None:
    raise RequestError("send max_tokens or max_completion_tokens, not both",
                       "max_completion_tokens")
  body = dict(body)
  if _get(body, "max_completion_tokens") is not None:
    body["max_tokens"] = body.pop("max_completion_tokens")
  prefix = _typed(body, "assistant_prefix", str, "")
  for where, content in [(f"messages[{i}].content", t["content"]) for i, t in enumerate(turns)
                         ] + [("assistant_prefix", prefix)]:
    if canvas.has_masks(content):
      raise RequestError(f"{where} holds <|mask|>: chat requests do not infill; send the "
                         "chat-templated text as a /v1/completions prompt instead", where)
  text = tokenizer.apply_chat_template(turns, add_generation_prompt=True) + prefix
  return _request(body, [text], defaults, settings)


def response_text(request: Request, completion: Completion, prompt: str) -> tuple[str, str]:
  """(text, finish_reason) of one row: a completion (echo, stop strings applied), the span
  between prompt and suffix (the same), or a filled `<|mask|>` prompt (whole)."""
  if request.infill and request.suffix is None:
    return completion.text, completion.finish_reason
  text = completion.fills[0] if request.suffix is not None else completion.text
  text, stopped = apply_stop(text, request.stop)
  return ((prompt if request.echo else "") + text,
          "stop" if stopped else completion.finish_reason)


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """`text` cut before the earliest stop string, and whether one was found."""
  cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


# ------------------------------------------------------------------------------ helpers


def _suffix(body, masked: bool, settings: Settings) -> tuple[str | None, int]:
  """(suffix, length): a non-empty `suffix` infills `length` masks (default: max_tokens)
  between each prompt and it; (None, 0) without one."""
  suffix = _typed(body, "suffix", str, None) or None  # "" is OpenAI's "no suffix"
  length = _typed(body, "length", int, None)
  if suffix is None:
    if length is not None:
      raise RequestError("length (the span to infill) needs a non-empty suffix", "length")
    return None, 0
  if masked:
    raise RequestError("send <|mask|> spans in the prompt or a suffix, not both", "suffix")
  if canvas.has_masks(suffix):
    raise RequestError("suffix holds <|mask|>: put every span to fill in the prompt, without "
                       "a suffix", "suffix")
  if length is None:
    length = _typed(body, "max_tokens", int, None)
    if length is None:
      return suffix, 0  # the configured max_new_tokens, filled in by _request
    where = "max_tokens"
  else:
    where = "length"
  if length < 1:
    raise RequestError(f"{where}={length} must be >= 1", where)
  if length > settings.max_tokens:
    raise RequestError(f"{where}={length} is more than this server's maximum of "
                       f"{settings.max_tokens} (serve.max_tokens)", where)
  return suffix, length


def _request(body, prompts, defaults, settings: Settings, *, infill: bool = False,
             **kw) -> Request:
  n = _typed(body, "n", int, 1)
  if n < 1:
    raise RequestError(f"n={n} must be >= 1", "n")
  if n * len(prompts) > settings.max_request_rows:
    raise RequestError(f"n={n} x {len(prompts)} prompt(s) = {n * len(prompts)} completions, "
                       f"more than this server's limit of {settings.max_request_rows} "
                       f"(serve.max_request_rows)", "n")
  stream = _typed(body, "stream", bool, False)
  stream_options = _typed(body, "stream_options", dict, None)
  include_usage = False
  if stream_options is not None:
    if not stream:
      raise RequestError("stream_options needs stream=true", "stream_options")
    unknown = sorted(set(stream_options) - {"include_usage"})
    if unknown:
      raise RequestError(f"stream_options has unknown field {unknown[0]!r}", "stream_options")
    include_usage = _typed(stream_options, "include_usage", bool, False, "stream_options")
  if kw.get("suffix") is not None and not kw.get("length"):
    kw["length"] = int(defaults["max_new_tokens"])
  options = _options(body, defaults, settings, infill=infill, length=kw.get("length", 0))
  return Request(prompts=tuple(prompts), n=n, options=options, stop=_stop(body),
                 stream=stream, include_usage=include_usage, **kw)


def _options(body, defaults, settings: Settings, *, infill: bool = False,
             length: int = 0) -> Options:
  """The sampler options: `defaults`, overridden by the request; checked by the sampler's
  own validator (its messages renamed to the request's field names). An infill request
  (`length`: its span, for the steps rule) runs without blocks or cache: the defaults' are
  dropped, a request's own are a 400."""
  o = dict(defaults.items())  # the section's form: "off" is 1.0 / 0 / "", never None
  if infill:
    for name, off in (("block_length", 0), ("cache", "")):
      if _get(body, name) not in (None, off) and not (name == "cache" and
                                                      _get(body, name) == "none"):
        raise RequestError(f"{name}={_get(body, name)!r}: infilling (a prompt holding "
                           f"<|mask|>, or a suffix) runs without blocks or a block cache; "
                           f"leave {name} out", name)
      o[name] = off
  max_tokens = _bounded(body, "max_tokens", settings.max_tokens)
  if infill:  # the span's masks (suffix; checked by _suffix), or none (<|mask|> prompts)
    max_tokens = length or None
  if max_tokens is not None:
    o["max_new_tokens"] = max_tokens
  for name in ("temperature", "top_p", "threshold", "alg_temp", "cfg_scale"):
    value = _typed(body, name, (int, float), None)
    if value is not None:
      if not math.isfinite(value):
        raise RequestError(f"{name}={value} must be a finite number", name)
      o[name] = float(value)
  for name in ("top_k", "block_length", "cache_refresh_every"):
    value = _typed(body, name, int, None)
    if value is not None:
      o[name] = value
  for name in ("alg", "cache"):
    value = _typed(body, name, str, None)
    if value is not None:
      o[name] = "" if name == "cache" and value == "none" else value
  for name in _BOOL_EXTRAS:
    value = _typed(body, name, bool, None)
    if value is not None:
      o[name] = value
  steps = _bounded(body, "steps", settings.max_tokens)
  if steps is not None:
    o["steps"] = steps
  elif max_tokens is not None:  # keep the configured tokens per step, whole steps per block
    o["steps"] = _default_steps(o, defaults)
  section = ml_collections.ConfigDict(o)
  try:
    validate_sampler(section, where="request")
  except ConfigError as e:
    message = str(e).replace("request.max_new_tokens", "max_tokens").replace("request.", "")
    param = next((f for f in ("max_tokens", "temperature", "top_p") + SAMPLER_EXTRAS
                  if message.startswith((f"{f}=", f"{f} "))), None)
    raise RequestError(message, param) from None
  return Options.from_section(section, seed=_typed(body, "seed", int, None), infill=infill)


def _default_steps(o, defaults) -> int:
  ratio = defaults["steps"] / defaults["max_new_tokens"]
  blocks = o["max_new_tokens"] // o["block_length"] if o["block_length"] else 1
  steps = max(1, round(o["max_new_tokens"] * ratio))
  return -(-steps // blocks) * blocks


def _message(m, i) -> tuple[str, str]:
  where = f"messages[{i}]"
  if not isinstance(m, dict):
    raise RequestError(f"{where} must be an object with role and content, not {_kind(m)}",
                       "messages")
  unknown = sorted(set(m) - {"role", "content", "name"})
  if unknown:
    raise RequestError(f"{where} has unknown field {unknown[0]!r}", f"{where}.{unknown[0]}")
  role = m.get("role")
  if role not in _ROLES:
    raise RequestError(f"{where}.role={role!r} is not one of {_ROLES}", f"{where}.role")
  content = m.get("content")
  if isinstance(content, list):  # content parts: text only
    texts = []
    for j, part in enumerate(content):
      if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
          part.get("text"), str):
        raise RequestError(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}}; "
                           "only text content is supported", f"{where}.content")
      texts.append(part["text"])
    content = "".join(texts)
  if not isinstance(content, str):
    raise RequestError(f"{where}.content must be a string or a list of text parts, not "
                       f"{_kind(content)}", f"{where}.content")
  return ("system" if role == "developer" else role), content


def _stop(body) -> tuple[str, ...]:
  stop = _get(body, "stop")
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stops, list) or len(stops) > _MAX_STOPS
      or not all(isinstance(s, str) and s for s in stops)):
    raise RequestError(f"stop must be a non-empty string or a list of at most {_MAX_STOPS} "
                       f"non-empty strings, not {stop!r}", "stop")
  return tuple(stops)


def _check_fields(body, known: Sequence[str]) -> None:
  if not isinstance(body, Mapping):
    raise RequestError(f"the request body must be a JSON object, not {_kind(body)}")
  for name in body:
    if name in known:
      continue
    if name in _NEUTRAL:
      value = body[name]
      if value is not None and not any(type(value) is type(v) and value == v
                                       for v in _NEUTRAL[name]):
        raise RequestError(f"{name}={value!r} is not supported by this server", name,
                           code="unsupported_field")
      continue
    raise RequestError(f"unknown field {name!r}; this server reads {sorted(known)}", name,
                       code="unknown_field")


def _get(body, name):
  return body.get(name)  # JSON null is "not given", as in OpenAI's API


def _bounded(body, name, maximum: int) -> int | None:
  """An optional int field in [1, maximum] (serve.max_tokens), or a 400 naming it."""
  value = _typed(body, name, int, None)
  if value is not None:
    if value < 1:
      raise RequestError(f"{name}={value} must be >= 1", name)
    if value > maximum:
      raise RequestError(f"{name}={value} is more than this server's maximum of {maximum} "
                         "(serve.max_tokens)", name)
  return value


def _typed(body, name, kind, default, where: str | None = None):
  value = _get(body, name)
  if value is None:
    return default
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
    expected = _EXPECTED[kinds[-1]]
    raise RequestError(f"{name} must be {expected}, not {_kind(value)} ({value!r})",
                       where or name, code="invalid_type")
  return value


_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             dict: "an object"}


def _kind(value) -> str:
  return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "a list", dict: "an object", type(None): "null"}.get(type(value),
                                                                    type(value).__name__)
