"""mode=serve (the OpenAI-compatible server, driven by the `openai` client on loopback) and
mode=sample's prompts_file: request parsing, errors, batching, compile counts, and greedy
outputs (completions, infilling, the LLaDA / Fast-dLLM options) equal to the sampler's and
to mode=sample's."""

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import openai
import pytest

from configs import sample as sample_config
from dcjax import config as config_lib
from dcjax.config import ConfigError
from dcjax.data.tokenizer import MASK
from dcjax.diffusion import canvas, decode
from dcjax.diffusion.sampler import generate
from dcjax.diffusion.sampler_config import sampler_kwargs
from dcjax.model import loading, param_shardings
from dcjax.modes import sample as sample_cli
from dcjax.modes import serve as serve_cli
from dcjax.parallel import mesh as mesh_lib
from dcjax.serve import requests as requests_lib
from dcjax.serve.engine import Engine
from dcjax.serve.server import Server
from dcjax.serve.settings import settings_from_config
from tests.test_sampler import random_params

TOK = decode.ByteTokenizer()
LOWERINGS = []  # every jaxpr -> MLIR lowering of the session: a compile of some program


def _count_lowering(event, duration, **kwargs):
  del duration, kwargs
  if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
    LOWERINGS.append(event)


jax.monitoring.register_event_duration_secs_listener(_count_lowering)


def tiny_config():
  c = sample_config.get_config()
  c.model.update(dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=16))
  c.sampler.update(dict(max_new_tokens=8, steps=8, temperature=0.0))
  c.serve.update(dict(port=0, batch_window_ms=0.0, max_tokens=32))
  return c


def host_init(model_config, rng, mesh):  # the random test model, made on the host: no compile
  del rng
  return jax.device_put(random_params(model_config), param_shardings(model_config, mesh))


@pytest.fixture(scope="module")
def served():
  """A server on a free loopback port over the tiny model; stopped at the module's end."""
  c = tiny_config()
  model_config = dataclasses.replace(config_lib.model_config(c), mask_token_id=TOK.mask_id)
  mesh = mesh_lib.make_mesh(c.mesh)
  params = host_init(model_config, None, mesh)
  engine = Engine(model_config, params, TOK, mesh, settings_from_config(c), log=lambda *a: None)
  with Server(engine, c.sampler, log=lambda *a: None) as server:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                           timeout=120)
    yield dict(server=server, client=client, config=c, engine=engine, params=params,
               mesh=mesh, model_config=model_config)


def _sampler_greedy(s, text, prompt_len=64, **options):
  """The sampler called directly: one row in a batch of 8, left-padded to `prompt_len`."""
  kwargs = {**sampler_kwargs(s["config"].sampler),
            "end_token_ids": decode.stop_token_ids(TOK), **options}
  ids, keep = decode.encode_left_padded(TOK, [text] * 8, length=prompt_len)
  out = generate(s["model_config"], s["params"], ids, keep, mesh=s["mesh"], **kwargs)
  return decode.decode_completions(TOK, jax.device_get(out.tokens), prompt_len)[0]


def _sampler_infilled(s, text, prompt_len=64, span=False, **options):
  """The sampler filling the canvas `text` directly (batch of 8, left-padded to
  `prompt_len`, nothing appended): row 0's real tokens (with `span`, only those it wrote into
  the masks), less the stop tokens it wrote into the masks, decoded without special tokens."""
  kwargs = {**sampler_kwargs(s["config"].sampler), "max_new_tokens": 0,
            "end_token_ids": decode.stop_token_ids(TOK), **options}
  ids, keep = canvas.encode_canvases(TOK, [text] * 8, length=prompt_len)
  out = generate(s["model_config"], s["params"], ids, keep, mesh=s["mesh"], **kwargs)
  stops = set(decode.stop_token_ids(TOK))
  kept = [int(t) for t, k, given in zip(jax.device_get(out.tokens)[0], keep[0], ids[0])
          if k and not (given == TOK.mask_id and int(t) in stops)
          and (given == TOK.mask_id or not span)]
  return TOK.decode(kept, skip_special_tokens=True)


def _post(url, payload, raw=None):
  data = raw if raw is not None else json.dumps(payload).encode()
  req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.load(r)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


# ------------------------------------------------------------------------- request parsing


def _parse(body, chat=False, **settings):
  c = tiny_config()
  c.serve.update(settings)
  parse = requests_lib.parse_chat if chat else requests_lib.parse_completion
  return parse(body, TOK, c.sampler, settings_from_config(c))


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "x", "extra": 1}, "extra", "unknown field 'extra'"),
    ({"prompt": "x", "alg": "greedy"}, "alg", "alg='greedy' is not one of"),
    ({"prompt": "x", "steps": 0}, "steps", "steps=0 must be >= 1"),
    ({"prompt": "x", "max_tokens": 33}, "max_tokens", "maximum of 32 (serve.max_tokens)"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens", "must be an integer, not a string"),
    ({"prompt": "x", "temperature": True}, "temperature", "must be a number"),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p=0.0 must be in (0, 1]"),
    ({"prompt": "x", "block_length": 3}, "block_length", "must divide max_tokens=8"),
    ({"prompt": "x", "threshold": 0.9, "alg": "origin"}, "threshold", "not 'origin'"),
    ({"prompt": "x", "cache": "full"}, "cache", "cache='full' is not one of"),
    ({"prompt": "x", "n": 65}, "n", "serve.max_request_rows"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "length": 4}, "length", "needs a non-empty suffix"),
    ({"prompt": "x", "suffix": "}", "length": 0}, "length", "length=0 must be >= 1"),
    ({"prompt": "x", "suffix": "}", "length": 33}, "length", "(serve.max_tokens)"),
    ({"prompt": "x", "suffix": "}", "length": 2.5}, "length", "must be an integer"),
    ({"prompt": "x", "suffix": "}", "max_tokens": 0}, "max_tokens", "must be >= 1"),
    ({"prompt": "a<|mask|>", "suffix": "}"}, "suffix", "in the prompt or a suffix, not both"),
    ({"prompt": "x", "suffix": "<|mask|>}"}, "suffix", "suffix holds <|mask|>"),
    ({"prompt": "a<|mask|>", "block_length": 4}, "block_length", "without blocks"),
    ({"prompt": "x", "suffix": "}", "cache": "dual"}, "cache", "without blocks"),
    ({"prompt": "a<|mask|>", "echo": True}, "echo", "whole filled text"),
    ({"prompt": "a<|mask|>", "stop": "\n"}, "stop", "whole filled text"),
    ({"prompt": ["a<|mask|>", "b"]}, "prompt", "prompt[1] holds no <|mask|>"),
    ({"prompt": "x", "cfg_scale": -1}, "cfg_scale", "cfg_scale=-1.0 must be >= 0"),
    ({"prompt": "x", "cfg_scale": 1.0, "cache": "prefix"}, "cfg_scale", "needs cache=''"),
    ({"prompt": "x", "early_stop": "yes"}, "early_stop", "must be a boolean"),
    ({"prompt": "x", "logits_eos_inf": 1}, "logits_eos_inf", "must be a boolean"),
    ({"prompt": "x", "confidence_eos_eot_inf": None, "alg": "rand"}, "alg", "'rand'"),
    ({"prompt": "x", "logprobs": 3}, "logprobs", "not supported"),
    ({"prompt": "x", "stream": "yes"}, "stream", "must be a boolean"),
    ({"prompt": [1, 2]}, "prompt", "token-id prompts are not supported"),
    ({"max_tokens": 8}, "prompt", "prompt is missing"),
    ({"prompt": ""}, "prompt", "prompt is empty"),
])
def test_bad_completion_requests_name_the_field(body, param, words):
  with pytest.raises(requests_lib.RequestError) as e:
    _parse(body)
  assert e.value.status == 400 and e.value.param == param
  assert words in e.value.message
  assert set(e.value.to_json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,param,words", [
    ({}, "messages", "messages is missing"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "an integer"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt", "unknown"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools", "not supported"),
    ({"messages": [{"role": "user", "content": "a<|mask|>"}]}, "messages[0].content",
     "chat requests do not infill"),
    ({"messages": [{"role": "user", "content": "x"}], "assistant_prefix": "<|mask|>"},
     "assistant_prefix", "chat requests do not infill"),
])
def test_bad_chat_requests_name_the_field(body, param, words):
  with pytest.raises(requests_lib.RequestError) as e:
    _parse(body, chat=True)
  assert e.value.param == param and words in e.value.message


def test_request_fields_map_to_sampler_options():
  r = _parse({"prompt": ["a", "b"], "n": 3, "max_tokens": 16, "temperature": 0.5, "top_p": 0.9,
              "steps": 8, "alg": "maskgit_plus", "block_length": 8, "cache": "dual",
              "top_k": 5, "seed": 7, "stop": "\n", "echo": True, "logprobs": None})
  assert r.rows == ["a"] * 3 + ["b"] * 3 and r.stop == ("\n",) and r.echo
  assert r.options.seed == 7
  expected = {**sampler_kwargs(tiny_config().sampler), "max_new_tokens": 16, "steps": 8,
              "alg": "maskgit_plus", "temperature": 0.5, "top_p": 0.9, "top_k": 5,
              "block_length": 8, "cache": "dual"}
  assert r.options.generate_kwargs() == expected
  # max_tokens alone keeps the configured 1 token per step (8 / 8), in whole blocks.
  assert _parse({"prompt": "a", "max_tokens": 16}).options.generate_kwargs()["steps"] == 16
  # Temperatures are array values of one program; steps are part of the program.
  key = lambda **kw: _parse({"prompt": "a", **kw}).options.program_key()
  assert key(temperature=0.5) == key(temperature=0.9) != key(temperature=0.0)
  assert key(steps=4) != key(steps=8) == key()
  chat = _parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 "max_completion_tokens": 4, "assistant_prefix": "```"}, chat=True)
  assert chat.prompts == (decode.chat_prompt(TOK, "hi", assistant_prefix="```"),)
  assert chat.options.max_new_tokens == 4
  assert requests_lib.apply_stop("ab\ncd", ["c", "\n"]) == ("ab", True)
  assert requests_lib.apply_stop("ab", ["z"]) == ("ab", False)


def test_infill_and_new_sampler_options_map_to_the_sampler():
  # The LLaDA / Fast-dLLM extras reach generate; cfg_scale values share a program.
  r = _parse({"prompt": "a", "cfg_scale": 1.5, "logits_eos_inf": True, "alg": "random",
              "confidence_eos_eot_inf": True, "early_stop": True, "seed": 3})
  expected = {**sampler_kwargs(tiny_config().sampler), "cfg_scale": 1.5, "alg": "random",
              "logits_eos_inf": True, "confidence_eos_eot_inf": True, "early_stop": True}
  assert r.options.generate_kwargs() == expected and not r.infill
  key = lambda **kw: _parse({"prompt": "a", **kw}).options.program_key()
  assert key(cfg_scale=1.0) == key(cfg_scale=2.0) != key(cfg_scale=0) == key()
  assert key(early_stop=True) != key()
  # <|mask|> prompts: the canvas is the prompt (nothing appended, max_tokens unused); the
  # configured block_length / cache are dropped, not an error.
  c = tiny_config()
  c.sampler.update(dict(block_length=4, cache="prefix"))
  settings = settings_from_config(c)
  r = requests_lib.parse_completion({"prompt": ["a<|mask|>b", "<|mask|>"], "n": 2,
                                     "max_tokens": 16}, TOK, c.sampler, settings)
  kwargs = r.options.generate_kwargs()
  assert r.infill and r.suffix is None and r.canvases == r.rows == ["a<|mask|>b"] * 2 + [
      "<|mask|>"] * 2
  assert (kwargs["max_new_tokens"], kwargs["block_length"], kwargs["cache"],
          kwargs["steps"]) == (0, None, None, 8)
  # suffix: prompt + length masks + suffix; length (default max_tokens, then the section's)
  # sets the steps as max_tokens does.
  r = _parse({"prompt": "def f(", "suffix": "):", "n": 2, "length": 16})
  assert r.canvases == ["def f(" + MASK * 16 + "):"] * 2 and r.rows == ["def f("] * 2
  assert r.options.infill and r.options.generate_kwargs()["steps"] == 16
  assert _parse({"prompt": "x", "suffix": "y", "max_tokens": 4}).length == 4
  assert _parse({"prompt": "x", "suffix": "y"}).length == 8
  assert _parse({"prompt": "x", "suffix": ""}).suffix is None  # OpenAI: "" is no suffix
  infill_key = _parse({"prompt": "a<|mask|>"}).options.program_key()
  assert infill_key != key() and dict(infill_key)["infill"]


# ------------------------------------------------------------------- the server, end to end


def test_completions_equal_the_sampler(served):
  client = served["client"]
  assert [m.id for m in client.models.list().data] == ["dcjax"]
  prompt = "def add(a, b):"
  r = client.completions.create(model="dcjax", prompt=prompt, max_tokens=8, temperature=0)
  expected = _sampler_greedy(served, prompt)
  assert r.choices[0].text == expected and r.object == "text_completion"
  assert r.usage.prompt_tokens == len(TOK.encode(prompt))
  tokens, finish = r.usage.completion_tokens, r.choices[0].finish_reason
  assert 0 <= tokens <= 8 and (finish == "length") == (tokens == 8)
  # echo, n and a stop string cut after decoding; the streamed text is the same.
  stop = expected[3] if len(expected) > 3 else "\x00"
  r = client.completions.create(model="dcjax", prompt=prompt, n=2, echo=True, stop=[stop],
                                temperature=0)
  assert [c.text for c in r.choices] == [prompt + expected.split(stop)[0]] * 2
  assert [c.index for c in r.choices] == [0, 1]
  chunks = list(client.completions.create(model="dcjax", prompt=prompt, temperature=0,
                                          stream=True))
  assert "".join(c.choices[0].text for c in chunks) == expected


def test_chat_equals_mode_sample(served, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(loading, "init_params", host_init)
  config = tiny_config()
  config.prompt = "hi"
  sample_cli.run(config, str(tmp_path))  # ChatML prompt, batch of 8, greedy
  capsys.readouterr()
  with open(tmp_path / "completions.jsonl") as f:
    expected = json.loads(f.readline())["completion"]
  client = served["client"]
  messages = [{"role": "user", "content": "hi"}]
  r = client.chat.completions.create(model="dcjax", messages=messages, temperature=0)
  assert r.choices[0].message.content == expected and r.object == "chat.completion"
  assert r.usage.prompt_tokens == len(TOK.encode(decode.chat_prompt(TOK, "hi")))
  chunks = list(client.chat.completions.create(
      model="dcjax", messages=messages, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
  assert chunks[-1].usage.total_tokens == r.usage.total_tokens



def _concurrent_greedy(client, server, prompts, window_s):
  """Greedy completions of `prompts`, one thread each, sent while the batcher waits `window_s`
  for a batch to fill."""
  results = [None] * len(prompts)

  def call(i):
    results[i] = client.completions.create(model="dcjax", prompt=prompts[i], temperature=0)

  threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
  server.batcher.window_s = window_s
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join(120)
  finally:
    server.batcher.window_s = 0.0
  return results

def test_concurrent_requests_share_a_batch_and_compile_nothing_new(served):
  client, engine, server = served["client"], served["engine"], served["server"]
  prompts = ["a", "bb", "def f():", "print("]
  alone = [client.completions.create(model="dcjax", prompt=p, temperature=0).choices[0].text
           for p in prompts]  # the default program, compiled by an earlier request or here
  compiles, lowerings, batches = engine.compiles, len(LOWERINGS), engine.stats["batches"]
  # Ample time for all four to arrive; 4 rows do not fill 8.
  results = _concurrent_greedy(client, server, prompts, window_s=2.0)
  assert [r.choices[0].text for r in results] == alone
  assert engine.stats["batches"] == batches + 1  # four requests, one batch of 8 rows
  assert server.batcher.batch_sizes[-1] == 4
  assert engine.compiles == compiles and len(LOWERINGS) == lowerings  # no new program
  # Another temperature value is not another program; other steps are.
  for temperature in (0.7, 0.9):
    client.completions.create(model="dcjax", prompt="a", temperature=temperature, seed=1)
  assert engine.compiles == compiles + 1
  lowerings = len(LOWERINGS)
  client.completions.create(model="dcjax", prompt="a", temperature=0.5, seed=1)
  assert len(LOWERINGS) == lowerings
  client.completions.create(model="dcjax", prompt="a", temperature=0, extra_body={"steps": 4})
  assert engine.compiles == compiles + 2 and len(LOWERINGS) > lowerings
  stats = json.load(urllib.request.urlopen(server.url + "/stats", timeout=30))
  assert stats["compiles"] == engine.compiles and stats["batch_size"] == 8


def test_infill_equals_the_sampler_on_the_same_canvas(served):
  client, engine = served["client"], served["engine"]
  compiles = engine.compiles
  # <|mask|> spans in the prompt: the whole filled text.
  text = "def f(x):" + MASK * 6 + "\n  return x"
  r = client.completions.create(model="dcjax", prompt=text, temperature=0)
  expected = _sampler_infilled(served, text)
  assert r.choices[0].text == expected
  assert expected.startswith("def f(x):") and expected.endswith("\n  return x")
  assert r.usage.prompt_tokens == len(TOK.encode("def f(x):\n  return x"))
  tokens, finish = r.usage.completion_tokens, r.choices[0].finish_reason
  assert 0 <= tokens <= 6 and (finish == "length") == (tokens == 6)
  # A suffix: the span between prompt and suffix (OpenAI's completion text), echo and n.
  prompt, suffix = "def add(a, b):", "\n    return c\n"
  r = client.completions.create(model="dcjax", prompt=prompt, suffix=suffix, temperature=0,
                                n=2, echo=True, extra_body={"length": 8})
  whole = _sampler_infilled(served, canvas.infill_text(prompt, suffix, 8))
  span = whole[len(prompt):len(whole) - len(suffix)]
  assert whole == prompt + span + suffix
  assert [c.text for c in r.choices] == [prompt + span] * 2
  chunks = list(client.completions.create(model="dcjax", prompt=prompt, suffix=suffix,
                                          temperature=0, stream=True, max_tokens=8))
  assert "".join(c.choices[0].text for c in chunks) == span
  # Both canvases pad to 64 tokens with 8 steps: one infill program, not the completions'.
  assert engine.compiles == compiles + 1


def test_infill_batches_only_with_the_same_canvas_bucket_and_mask_count(served):
  client, engine, server = served["client"], served["engine"], served["server"]
  texts = ["a" + MASK * 6 + "b", "def f():" + MASK * 6 + "\n", "c" + MASK * 7]
  alone = [client.completions.create(model="dcjax", prompt=t, temperature=0).choices[0].text
           for t in texts]
  batches = engine.stats["batches"]
  # All three arrive; neither batch fills its 8 rows.
  results = _concurrent_greedy(client, server, texts, window_s=1.5)
  # Dream's schedule reads the batch's average mask count: 6-mask canvases share a batch,
  # the 7-mask one runs in its own, and every fill equals the one sampled alone.
  assert [r.choices[0].text for r in results] == alone
  assert engine.stats["batches"] == batches + 2
  assert sorted(server.batcher.batch_sizes[-2:]) == [1, 2]


def test_new_sampler_options_equal_the_sampler(served):
  client, engine = served["client"], served["engine"]
  extras = {"cfg_scale": 1.0, "logits_eos_inf": True, "confidence_eos_eot_inf": True,
            "early_stop": True}
  prompt = "def add(a, b):"
  r = client.completions.create(model="dcjax", prompt=prompt, temperature=0, extra_body=extras)
  assert r.choices[0].text == _sampler_greedy(served, prompt, **extras)
  # alg="random": the batch's key is the seed folded with the engine's batch index.
  index = engine.stats["batches"]
  r = client.completions.create(model="dcjax", prompt=prompt, temperature=0, seed=5,
                                extra_body={**extras, "alg": "random", "cfg_scale": 2.0})
  rng = jax.random.fold_in(jax.random.key(5), index)
  assert r.choices[0].text == _sampler_greedy(served, prompt, rng=rng,
                                              **{**extras, "alg": "random", "cfg_scale": 2.0})


def test_bad_requests_get_openai_errors(served):
  client, url = served["client"], served["server"].url
  cases = [({"extra_body": {"alg": "greedy"}}, "alg"), ({"extra_body": {"steps": 0}}, "steps"),
           ({"max_tokens": 10_000}, "max_tokens"), ({"extra_body": {"colour": 1}}, "colour"),
           ({"suffix": "}", "extra_body": {"block_length": 4}}, "block_length"),
           ({"prompt": "a<|mask|>b", "extra_body": {"cache": "prefix"}}, "cache"),
           ({"prompt": "a<|mask|>b", "suffix": "c"}, "suffix"),
           ({"extra_body": {"length": 4}}, "length"),
           ({"suffix": "}", "extra_body": {"length": 33}}, "length"),
           ({"extra_body": {"cfg_scale": -1}}, "cfg_scale"),
           ({"extra_body": {"cfg_scale": 1, "cache": "dual"}}, "cfg_scale"),
           ({"extra_body": {"early_stop": "yes"}}, "early_stop"),
           ({"prompt": "a<|mask|>b", "echo": True}, "echo")]
  for kwargs, param in cases:
    with pytest.raises(openai.BadRequestError) as e:
      client.completions.create(model="dcjax", **{"prompt": "x", **kwargs})
    assert e.value.status_code == 400 and e.value.param == param, kwargs
    assert param in e.value.message
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model="dcjax", messages=[])
  assert e.value.param == "messages"
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model="dcjax",
                                   messages=[{"role": "user", "content": "a<|mask|>"}])
  assert e.value.param == "messages[0].content" and "do not infill" in e.value.message
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="gpt-4", prompt="x")
  assert e.value.param == "model" and e.value.code == "model_not_found"
  status, body = _post(url + "/v1/completions", None, raw=b"{not json")
  assert status == 400 and body["error"]["code"] == "invalid_json"
  status, body = _post(url + "/v1/completions", {"model": "dcjax", "max_tokens": "8"})
  assert status == 400 and body["error"]["param"] == "prompt"
  status, body = _post(url + "/v1/completions", {"prompt": "x", "max_tokens": "8"})
  assert status == 400 and body["error"]["param"] == "max_tokens"
  assert set(body["error"]) == {"message", "type", "param", "code"}
  status, body = _post(url + "/v1/completions", {"prompt": "x" * 1025})
  assert status == 400 and "serve.max_prompt_tokens" in body["error"]["message"]
  status, body = _post(url + "/v1/embeddings", {"input": "x"})
  assert status == 404 and body["error"]["code"] == "not_found"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_serve_mode_answers_until_max_requests(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(loading, "init_params", host_init)
  config = tiny_config()
  config.mode = "serve"
  config.serve.update(dict(port=_free_port(), max_requests=2, batch_window_ms=0.0))
  config_lib.validate(config)
  thread = threading.Thread(target=serve_cli.run, args=(config, str(tmp_path)), daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{config.serve.port}"
  deadline = time.monotonic() + 120
  while True:
    try:
      urllib.request.urlopen(url + "/health", timeout=5)  # request 1
      break
    except OSError:
      assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
      time.sleep(0.2)
  status, body = _post(url + "/v1/completions", {"prompt": "hi", "temperature": 0})  # 2
  assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
  thread.join(60)
  assert not thread.is_alive()
  printed = capsys.readouterr().out
  assert "served 2 requests" in printed and "1 compiled programs" in printed


def test_serve_config_errors_name_the_field():
  config = tiny_config()
  config.mode = "serve"
  config.serve.batch_size = 0
  with pytest.raises(ConfigError, match="config.serve.batch_size"):
    config_lib.validate(config)
  config.serve.batch_size, config.serve.max_tokens = 8, 4
  with pytest.raises(ConfigError, match="config.serve.max_tokens"):
    config_lib.validate(config)


# --------------------------------------------------------------------- prompts_file (sample)


def test_prompts_file_batches_lines_through_the_engine(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(loading, "init_params", host_init)
  lines = [{"prompt": "hi"},
           {"id": "m", "messages": [{"role": "user", "content": "hi"}]},
           {"prompt": "hello", "n": 2, "stop": ["\x00"]},
           {"prompt": "hi", "steps": 4},
           {"prompt": "hi", "suffix": "!", "length": 8}]
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  config = tiny_config()
  config.prompts_file = str(path)
  config.outputs_file = str(tmp_path / "out" / "completions.jsonl")
  sample_cli.run(config, str(tmp_path / "wd"))
  printed = capsys.readouterr().out
  # 4 rows with one option set, 1 with steps=4, 1 infilled.
  assert "3 batches, 3 compiled programs" in printed
  with open(config.outputs_file) as f:
    rows = [json.loads(x) for x in f]
  assert [(r["line"], r["index"]) for r in rows] == [(1, 0), (2, 0), (3, 0), (3, 1), (4, 0),
                                                     (5, 0)]
  assert rows[1]["id"] == "m" and "id" not in rows[0]
  chat_hi = decode.chat_prompt(TOK, "hi")
  assert rows[0]["prompt"] == rows[1]["prompt"] == chat_hi  # config.chat wraps "prompt" lines
  assert rows[0]["completion"] == rows[1]["completion"]
  assert rows[2]["completion"] == rows[3]["completion"]  # greedy: n copies agree
  # The same batch as a 64-token-bucket request to the sampler.
  s = {"config": config, "params": host_init(_model_config(config), None, _mesh(config)),
       "model_config": _model_config(config), "mesh": _mesh(config)}
  assert rows[0]["completion"] == _sampler_greedy(s, chat_hi)
  assert rows[4]["completion"] == _sampler_greedy(s, chat_hi, steps=4)
  # A suffix line: the chat-wrapped prompt, 8 masks, the suffix; the completion is the span.
  assert rows[5]["prompt"] == chat_hi
  assert rows[5]["completion"] == _sampler_infilled(  # 59 + 8 + 1 tokens: the 128 bucket
      s, chat_hi + MASK * 8 + "!", prompt_len=128, span=True)


def _model_config(config):
  return dataclasses.replace(config_lib.model_config(config), mask_token_id=TOK.mask_id)


def _mesh(config):
  return mesh_lib.make_mesh(config.mesh)


def test_prompts_file_errors_name_the_line_and_field(tmp_path, monkeypatch):
  monkeypatch.setattr(loading, "init_params", host_init)
  path = tmp_path / "prompts.jsonl"
  path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "alg": "x"}))
  config = tiny_config()
  config.prompts_file = str(path)
  with pytest.raises(ConfigError, match=r"line 2 \(alg\): alg='x' is not one of"):
    sample_cli.run(config, str(tmp_path))
  assert not (tmp_path / "completions.jsonl").exists()
  config.prompts_file = ""
  config.prompt = ""
  with pytest.raises(ConfigError, match="config.prompt"):
    sample_cli.validate(config)
