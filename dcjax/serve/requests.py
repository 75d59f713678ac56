"""OpenAI request bodies -> prompt texts + sampler `Options`; a `RequestError` (HTTP 4xx,
naming the field) for anything else (docs/serving.md).

`parse_completion` reads a `/v1/completions` body, `parse_chat` a `/v1/chat/completions`
body (the messages go through the tokenizer's ChatML template). Both accept the dcjax
sampler fields as top-level extras (the openai client's `extra_body`): `steps`, `alg`,
`block_length`, `threshold`, `cache`, `cache_refresh_every`, `top_k`, `alg_temp`. Every
other unknown field is a 400 that names it.

Infilling plugs in at `_suffix`: the completions `suffix` is parsed and type-checked here and
refused there, so wiring it to the sampler is one call (the engine receives
`Request.suffix`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import ml_collections

from dcjax.config import ConfigError
from dcjax.data.tokenizer import Tokenizer
from dcjax.diffusion.sampler_config import validate_sampler
from dcjax.serve.engine import Options
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
  suffix: str | None = None

  @property
  def rows(self) -> list[str]:
    return [p for p in self.prompts for _ in range(self.n)]


SAMPLER_EXTRAS = ("steps", "alg", "block_length", "threshold", "cache", "cache_refresh_every",
                  "top_k", "alg_temp")
_COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
           "stop", "seed", "user") + SAMPLER_EXTRAS
COMPLETION_FIELDS = _COMMON + ("prompt", "suffix", "echo")
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
  suffix = _suffix(body)
  echo = _typed(body, "echo", bool, False)
  return _request(body, prompts, defaults, settings, echo=echo, suffix=suffix)


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
  text = tokenizer.apply_chat_template(turns, add_generation_prompt=True) + prefix
  return _request(body, [text], defaults, settings)


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """`text` cut before the earliest stop string, and whether one was found."""
  cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


# ------------------------------------------------------------------------------ helpers


def _suffix(body) -> str | None:
  """The infilling hook: a `suffix` is type-checked, then refused until the sampler fills
  a span between prompt and suffix (then: return it, and the engine builds that canvas)."""
  suffix = _typed(body, "suffix", str, None)
  if suffix:
    raise RequestError("suffix (infilling) is not supported yet by this server; send the "
                       "prompt only", "suffix", code="unsupported_field")
  return None


def _request(body, prompts, defaults, settings: Settings, **kw) -> Request:
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
  return Request(prompts=tuple(prompts), n=n, options=_options(body, defaults, settings),
                 stop=_stop(body), stream=stream, include_usage=include_usage, **kw)


def _options(body, defaults, settings: Settings) -> Options:
  """The sampler options: `defaults`, overridden by the request; checked by the sampler's
  own validator (its messages renamed to the request's field names)."""
  o = dict(defaults.items())  # the section's form: "off" is 1.0 / 0 / "", never None
  max_tokens = _typed(body, "max_tokens", int, None)
  if max_tokens is not None:
    if max_tokens < 1:
      raise RequestError(f"max_tokens={max_tokens} must be >= 1", "max_tokens")
    if max_tokens > settings.max_tokens:
      raise RequestError(f"max_tokens={max_tokens} is more than this server's maximum of "
                         f"{settings.max_tokens} (serve.max_tokens)", "max_tokens")
    o["max_new_tokens"] = max_tokens
  for name in ("temperature", "top_p", "threshold", "alg_temp"):
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
  steps = _typed(body, "steps", int, None)
  if steps is not None:
    if steps < 1:
      raise RequestError(f"steps={steps} must be >= 1", "steps")
    if steps > settings.max_tokens:
      raise RequestError(f"steps={steps} is more than this server's maximum of "
                         f"{settings.max_tokens} (serve.max_tokens)", "steps")
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
  return Options.from_section(section, seed=_typed(body, "seed", int, None))


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
