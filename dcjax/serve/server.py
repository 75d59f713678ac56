"""The OpenAI-compatible HTTP server (standard library `ThreadingHTTPServer`; docs/serving.md).

  GET  /v1/models, /v1/models/<id>   the one served model
  POST /v1/completions               `prompt` (string or list; `<|mask|>` / `suffix` infill),
                                     OpenAI's completion objects
  POST /v1/chat/completions          `messages`, through the tokenizer's chat template
  GET  /health, /stats               liveness; the engine's batches and compiled programs

Each request is parsed and checked on its handler thread (`dcjax.serve.requests`), its
token-id rows queued in the `Batcher` (one job per `Engine.batch_key`: infill canvases of
another bucket or mask count go to another batch), and the handler waits for its
completions. `stream` answers with server-sent events: the sampler fills the whole canvas in
one compiled program, so each choice arrives as one chunk when its batch is done, then
`data: [DONE]`.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import threading
import time
import uuid
from typing import Callable

from dcjax.serve.batcher import Batcher
from dcjax.serve.engine import Completion, Engine, ProgramLimitError
from dcjax.serve.requests import (Request, RequestError, parse_chat, parse_completion,
                                  response_text)

MAX_BODY_BYTES = 16 << 20


class Server:
  """`with Server(engine, config.sampler) as s:` serves on a thread at `s.url` until the
  block ends; `serve_forever()` serves on the caller's thread instead. Requests override the
  sampler section's defaults."""

  def __init__(self, engine: Engine, defaults, *, log: Callable = print):
    self.engine, self.defaults, self.log = engine, defaults, log
    self.settings = engine.settings
    self.model = self.settings.model_name
    self.created = int(time.time())
    self.requests = 0
    self._count_lock = threading.Lock()
    self.batcher = Batcher(engine, self.settings.batch_window_ms / 1000)
    self.httpd = http.server.ThreadingHTTPServer((self.settings.host, self.settings.port),
                                                 _handler(self))
    self.httpd.daemon_threads = True
    self._thread: threading.Thread | None = None
    self._served = False  # shutdown() waits for a serve_forever loop: only after one ran

  @property
  def url(self) -> str:
    host, port = self.httpd.server_address[:2]
    return f"http://{host}:{port}"

  def serve_forever(self) -> None:
    self._served = True
    self.httpd.serve_forever(poll_interval=0.1)

  def start(self) -> "Server":
    self._served = True
    self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,),
                                    name="dcjax-http", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    if self._served:
      self.httpd.shutdown()
    self.httpd.server_close()
    self.batcher.stop()
    if self._thread is not None:
      self._thread.join(10)

  def __enter__(self) -> "Server":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def counted(self) -> None:
    """One request answered; past `max_requests`, stop serving (from another thread)."""
    with self._count_lock:
      self.requests += 1
      done = self.settings.max_requests and self.requests == self.settings.max_requests
    if done:
      threading.Thread(target=self.httpd.shutdown, daemon=True).start()

  # -- endpoints
  def model_object(self) -> dict:
    return {"id": self.model, "object": "model", "created": self.created, "owned_by": "dcjax"}

  def complete(self, body: dict, chat: bool) -> tuple[Request, list[Completion]]:
    self._check_model(body)
    parse = parse_chat if chat else parse_completion
    request = parse(body, self.engine.tokenizer, self.defaults, self.settings)
    rows = [self.engine.encode(text) for text in request.canvases]
    problem = self.engine.check(rows, request.options)
    if problem is not None:
      param, message = problem
      raise RequestError(message, "messages" if chat and param == "prompt" else param)
    groups: dict[tuple, list[int]] = {}  # batch key -> row indices
    for i, row in enumerate(rows):
      groups.setdefault(self.engine.batch_key(row, request.options), []).append(i)
    buckets = {self.engine.prompt_len(max(len(rows[i]) for i in members))
               for members in groups.values()}
    if not all(self.engine.can_compile(request.options, p) for p in buckets):
      raise RequestError(
          f"these options need a new compiled sampler program and this server holds its "
          f"maximum of serve.max_programs={self.settings.max_programs}; reuse the steps / "
          f"alg / max_tokens / block_length / threshold / cache of earlier requests",
          code="too_many_programs")
    futures = [(members, self.batcher.submit([rows[i] for i in members], request.options,
                                             key=key))
               for key, members in groups.items()]
    completions: list = [None] * len(rows)
    deadline = time.monotonic() + (self.settings.request_timeout_s or float("inf"))
    try:
      for members, future in futures:
        remaining = deadline - time.monotonic()
        results = future.result(timeout=None if remaining == float("inf") else
                                max(remaining, 0))
        for i, c in zip(members, results):
          completions[i] = c
    except ProgramLimitError as e:
      raise RequestError(str(e), code="too_many_programs") from None
    except concurrent.futures.TimeoutError:
      for _, future in futures:
        future.cancel()
      raise RequestError(f"no completion within serve.request_timeout_s="
                         f"{self.settings.request_timeout_s}s", status=504,
                         kind="server_error", code="timeout") from None
    return request, completions

  def _check_model(self, body) -> None:
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != self.model:
      raise RequestError(f"model {model!r} does not exist; this server serves {self.model!r}",
                         "model", status=404, code="model_not_found")


def choices(request: Request, completions: list[Completion], chat: bool) -> list[dict]:
  out = []
  for index, (prompt, c) in enumerate(zip(request.rows, completions)):
    text, finish = response_text(request, c, prompt)
    if chat:
      out.append({"index": index, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None})
    else:
      out.append({"index": index, "text": text, "finish_reason": finish, "logprobs": None})
  return out


def usage(request: Request, completions: list[Completion]) -> dict:
  prompt = sum(c.prompt_tokens for c in completions[::request.n])
  done = sum(c.completion_tokens for c in completions)
  return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _handler(server: Server):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection's thread ends after this

    def log_message(self, fmt, *args):  # one line per request through the server's log
      server.log(f"{self.address_string()} {fmt % args}")

    def do_GET(self):  # pylint: disable=invalid-name
      path = self.path.split("?")[0].rstrip("/")
      if path == "/v1/models":
        self._json(200, {"object": "list", "data": [server.model_object()]})
      elif path.startswith("/v1/models/"):
        name = path[len("/v1/models/"):]
        if name == server.model:
          self._json(200, server.model_object())
        else:
          self._error(RequestError(f"model {name!r} does not exist; this server serves "
                                   f"{server.model!r}", "model", status=404,
                                   code="model_not_found"))
      elif path == "/health":
        self._json(200, {"status": "ok"})
      elif path == "/stats":
        self._json(200, {**server.engine.snapshot(), "requests": server.requests,
                         "jobs_per_batch": list(server.batcher.batch_sizes)})
      else:
        self._error(RequestError(f"no route GET {path}", status=404, code="not_found"))

    def do_POST(self):  # pylint: disable=invalid-name
      path = self.path.split("?")[0].rstrip("/")
      try:
        if path not in ("/v1/completions", "/v1/chat/completions"):
          self._read_body()
          raise RequestError(f"no route POST {path}", status=404, code="not_found")
        chat = path == "/v1/chat/completions"
        request, completions = server.complete(self._read_body(), chat)
      except RequestError as e:
        self._error(e)
        return
      except Exception as e:  # pylint: disable=broad-except
        server.log(f"error: {type(e).__name__}: {e}")
        self._error(RequestError(f"{type(e).__name__}: {e}", status=500, kind="server_error"))
        return
      kind = "chat.completion" if chat else "text_completion"
      head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "object": kind,
              "created": int(time.time()), "model": server.model}
      if request.stream:
        self._stream(head, request, completions, chat)
      else:
        self._json(200, {**head, "choices": choices(request, completions, chat),
                         "usage": usage(request, completions)})

    def _read_body(self):
      length = self.headers.get("Content-Length")
      if length is None or not length.isdigit():
        self.close_connection = True
        raise RequestError("the request needs a Content-Length header and a JSON body",
                           status=411 if length is None else 400)
      if int(length) > MAX_BODY_BYTES:
        self.close_connection = True
        raise RequestError(f"the body is {length} bytes, more than {MAX_BODY_BYTES}", status=413)
      raw = self.rfile.read(int(length))
      try:
        return json.loads(raw or b"null")
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}", code="invalid_json") from None

    def _stream(self, head, request: Request, completions, chat: bool):
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.send_header("Connection", "close")
      self.end_headers()
      self.close_connection = True
      kind = "chat.completion.chunk" if chat else "text_completion"
      for choice in choices(request, completions, chat):
        finish = choice.pop("finish_reason")
        if chat:
          message = choice.pop("message")
          events = [{**choice, "delta": {"role": "assistant", "content": ""},
                     "finish_reason": None},
                    {**choice, "delta": {"content": message["content"]}, "finish_reason": None},
                    {**choice, "delta": {}, "finish_reason": finish}]
        else:
          events = [{**choice, "finish_reason": finish}]
        for event in events:
          self._event({**head, "object": kind, "choices": [event]})
      if request.include_usage:
        self._event({**head, "object": kind, "choices": [],
                     "usage": usage(request, completions)})
      self.wfile.write(b"data: [DONE]\n\n")
      self.wfile.flush()
      server.counted()

    def _event(self, data: dict):
      self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
      self.wfile.flush()

    def _error(self, e: RequestError):
      self._json(e.status, e.to_json())

    def _json(self, status: int, data: dict):
      payload = json.dumps(data).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)
      server.counted()

  return Handler
