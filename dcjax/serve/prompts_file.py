"""`config.prompts_file` (mode=sample): a JSONL file of prompts sampled in batches through the
same `Engine` as the server (docs/serving.md).

Each line is `{"prompt": str}` (wrapped in the chat template when `config.chat`, as
`config.prompt` is) or `{"messages": [...]}` (always the template), with the request fields
of the HTTP API as per-line options (`max_tokens`, `temperature`, `n`, `stop`, `steps`,
`alg`, ...) over `config.sampler`, and an optional `id` copied to the outputs. A prompt
holding `<|mask|>`, or one with a `suffix` (and `length`), is infilled as over HTTP: its
completion is the whole filled text, or the span between prompt and suffix. The whole
file is checked before anything is sampled; a bad line is a ConfigError naming the line and
the field. Lines with equal options are sampled together, `serve.batch_size` rows a batch.
Outputs: one JSON line per completion, in file order:
`{"line", "id"?, "index", "prompt", "completion", "finish_reason"}`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax

from dcjax import workdir as workdir_lib
from dcjax.config import ConfigError
from dcjax.diffusion import decode
from dcjax.serve.engine import Engine
from dcjax.serve.requests import (Request, RequestError, parse_chat, parse_completion,
                                  response_text)

_FILE_ONLY = ("id",)


@dataclasses.dataclass(frozen=True)
class Line:
  number: int  # 1-based
  id: Any
  request: Request


def read_lines(path: str, engine: Engine, defaults, *, chat: bool,
               assistant_prefix: str = "") -> list[Line]:
  """The parsed, checked lines of `path`; ConfigError naming the first bad line and field."""
  where = f"config.prompts_file={path!r}"
  try:
    text = workdir_lib.epath(path).read_text()
  except (OSError, FileNotFoundError) as e:
    raise ConfigError(f"{where}: cannot read it ({type(e).__name__}: {e})") from None
  lines = []
  for number, raw in enumerate(text.splitlines(), 1):
    if not raw.strip():
      continue
    try:
      body = json.loads(raw)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{where} line {number}: not valid JSON ({e})") from None
    try:
      lines.append(_line(number, body, engine, defaults, chat, assistant_prefix))
    except RequestError as e:
      field = f" ({e.param})" if e.param else ""
      raise ConfigError(f"{where} line {number}{field}: {e.message}") from None
  if not lines:
    raise ConfigError(f"{where} holds no prompts (one JSON object a line)")
  return lines


def _line(number, body, engine: Engine, defaults, chat, assistant_prefix) -> Line:
  if not isinstance(body, dict):
    raise RequestError("a line must be a JSON object with prompt or messages")
  for name in ("stream", "echo"):
    if name in body:
      raise RequestError(f"{name} has no meaning in a prompts file", name)
  fields = {k: v for k, v in body.items() if k not in _FILE_ONLY}
  settings, tok = engine.settings, engine.tokenizer
  if "messages" in body:
    if "prompt" in body:
      raise RequestError("a line has prompt or messages, not both", "prompt")
    if assistant_prefix and "assistant_prefix" not in fields:
      fields["assistant_prefix"] = assistant_prefix
    request = parse_chat(fields, tok, defaults, settings)
  else:
    request = parse_completion(fields, tok, defaults, settings)
    if chat:
      request = dataclasses.replace(request, prompts=tuple(
          decode.chat_prompt(tok, p, assistant_prefix=assistant_prefix)
          for p in request.prompts))
  problem = engine.check([engine.encode(t) for t in request.canvases], request.options)
  if problem is not None:
    raise RequestError(problem[1], problem[0])
  return Line(number, body.get("id"), request)


def sample_lines(lines: list[Line], engine: Engine) -> list[list[dict]]:
  """Each line's output rows; lines with equal options share batches."""
  groups: dict = {}
  for i, line in enumerate(lines):
    groups.setdefault(line.request.options, []).append(i)
  outputs: list[list[dict]] = [[] for _ in lines]
  for options, members in groups.items():
    rows, owners = [], []
    for i in members:
      for text in lines[i].request.canvases:
        rows.append(engine.encode(text))
        owners.append(i)
    completions = engine.run(rows, options)
    for i, c in zip(owners, completions):
      line = lines[i]
      prompt = line.request.rows[len(outputs[i])]
      text, finish = response_text(line.request, c, prompt)
      row = {"line": line.number, "index": len(outputs[i]), "prompt": prompt,
             "completion": text, "finish_reason": finish}
      if line.id is not None:
        row = {"id": line.id, **row}
      outputs[i].append(row)
  return outputs


def sample_file(config, wd: workdir_lib.Workdir, engine: Engine,
                log: Callable[[str], None] = print) -> str | None:
  """Samples `config.prompts_file`; process 0 writes the outputs and returns their path."""
  lines = read_lines(config.prompts_file, engine, config.sampler, chat=bool(config.get("chat", False)),
                     assistant_prefix=str(config.get("assistant_prefix", "")))
  rows = sum(len(line.request.rows) for line in lines)
  log(f"{config.prompts_file}: {len(lines)} lines, {rows} completions, "
      f"batches of {engine.batch_size}")
  outputs = sample_lines(lines, engine)
  log(f"{engine.stats['batches']} batches, {engine.compiles} compiled programs")
  if jax.process_index() != 0:
    return None
  path = config.get("outputs_file") or wd.path("completions.jsonl")
  text = "".join(json.dumps(row) + "\n" for rows_of_line in outputs for row in rows_of_line)
  out = workdir_lib.epath(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  log(f"wrote {rows} completions to {path}")
  return str(path)
