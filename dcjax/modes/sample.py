"""`mode="sample"`: load a model (`hf_dir`, a previous run's `checkpoint_dir`, or a random tiny
one), sample, print completions; with `config.prompts_file`, batch-sample a JSONL file
instead (dcjax/serve/prompts_file.py, docs/serving.md). A prompt holding `<|mask|>` spans,
or `config.infill` (prefix / suffix / length), is infilled: the canvas is the text itself,
nothing is appended (docs/sampler.md, "Infilling").

Writes `completions.jsonl` to the workdir, and with `config.visualize` the decoding-order
pictures `decoding_order.html` and `decoding_order.png`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from dcjax.config import ConfigError
from dcjax import workdir as workdir_lib
from dcjax.diffusion import canvas, decode, visualize
from dcjax.diffusion.loading import load_model_and_tokenizer
from dcjax.diffusion.sampler import generate
from dcjax.diffusion.sampler_config import sampler_kwargs, validate_sampler
from dcjax.parallel import mesh as mesh_lib
from dcjax.parallel import sharding
from dcjax.parallel.rules import MESH_AXES
from dcjax.serve import prompts_file
from dcjax.serve.engine import Engine
from dcjax.serve.settings import settings_from_config
from dcjax.train import handoff


def validate(config) -> None:
  """Checks config.sampler and the sample-mode fields; raises ConfigError naming the field."""
  if "sampler" not in config:
    raise ConfigError("config.sampler is missing (see configs/sample.py)")
  validate_sampler(config.sampler)
  if config.get("prompts_file"):  # batch-sample a JSONL file (docs/serving.md)
    settings_from_config(config)
  elif not isinstance(config.get("prompt"), str) or not (config.prompt or _infill_length(config)):
    raise ConfigError("config.prompt must be a non-empty string")
  infill = config.get("infill") or {}
  for name, kind in (("prefix", str), ("suffix", str), ("length", int)):
    if name in infill and (not isinstance(infill[name], kind) or isinstance(infill[name], bool)):
      raise ConfigError(f"config.infill.{name}={infill[name]!r} must be of type {kind.__name__}")
  if _infill_length(config) < 0:
    raise ConfigError(f"config.infill.length={config.infill.length} must be >= 0 (0: off)")


def _infill_length(config) -> int:
  infill = config.get("infill") or {}
  return infill.get("length", 0) if isinstance(infill.get("length", 0), int) else 0


def prompt_text(config, tokenizer) -> str:
  """The sample mode's text: the prompt (ChatML-wrapped with `chat`), then with
  `config.infill.length` > 0 `prefix + "<|mask|>" * length + suffix`."""
  text = config.prompt
  if config.get("chat", False):
    text = decode.chat_prompt(tokenizer, text, assistant_prefix=config.get("assistant_prefix", ""))
  if _infill_length(config) > 0:
    text += canvas.infill_text(config.infill.get("prefix", ""), config.infill.get("suffix", ""),
                               config.infill.length)
  return text
  if config.get("num_samples", 1) < 1:
    raise ConfigError(f"config.num_samples={config.num_samples} must be >= 1")


def run(config, workdir: "str | workdir_lib.Workdir") -> None:
  validate(config)
  wd = workdir_lib.resolve(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  model_config, params, tokenizer = load_model_and_tokenizer(
      config, mesh, handoff.from_config(config, "checkpoint_dir"))
  if config.get("prompts_file"):
    engine = Engine(model_config, params, tokenizer, mesh, settings_from_config(config),
                    seed=config.seed)
    prompts_file.sample_file(config, wd, engine)
    return
  text = prompt_text(config, tokenizer)
  infilling = canvas.has_masks(text)
  shards = int(np.prod([mesh.shape[a] for a in MESH_AXES[:2]]))
  batch = -(-int(config.get("num_samples", 1)) // shards) * shards
  ids, keep = canvas.encode_canvases(tokenizer, [text] * batch)
  kwargs = sampler_kwargs(config.sampler)
  kwargs["end_token_ids"] = decode.stop_token_ids(tokenizer)
  if infilling:  # the canvas is the text: its masks, nothing appended
    kwargs["max_new_tokens"] = 0
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  log(f"sampling {batch} x {kwargs['max_new_tokens']} tokens after a {ids.shape[1]}-token "
      f"prompt on {dict(mesh.shape)}: {kwargs}")

  rng = jax.random.key(config.seed)
  start = time.perf_counter()
  out = generate(model_config, params, ids, keep, rng=rng, mesh=mesh, **kwargs)
  # Collectives on a pod (the rows live on every host): all processes, before process 0 writes.
  tokens = sharding.to_host(out.tokens)
  reveal_all = sharding.to_host(out.reveal_step) if config.get("visualize", False) else None
  seconds = time.perf_counter() - start
  num_steps, full = int(out.num_steps), int(out.num_full_forwards)
  generated = batch * kwargs["max_new_tokens"] + int((ids == tokenizer.mask_id).sum())
  log(f"{num_steps} steps ({full} full-canvas forwards), {seconds:.2f}s including compile, "
      f"{generated / seconds:.1f} tokens/s")

  p = ids.shape[1]
  if infilling:  # the whole filled text; the pictures show the canvas from its first token
    texts = canvas.filled_texts(tokenizer, tokens, keep)
    p = int(np.argmax(keep[0]))
  else:
    texts = decode.decode_completions(tokenizer, tokens, p)
  num_samples = int(config.get("num_samples", 1))
  if jax.process_index() != 0:  # every process holds the same completions; one writes them
    return
  os.makedirs(wd.local, exist_ok=True)
  with open(wd.path("completions.jsonl"), "w") as f:
    for i, completion in enumerate(texts[:num_samples]):
      print(f"--- sample {i}\n{completion}")
      f.write(json.dumps({"prompt": text, "completion": completion}) + "\n")

  if reveal_all is not None:
    reveal = reveal_all[:num_samples, p:]
    token_texts = [[tokenizer.decode([int(t)]) for t in row[p:]] for row in tokens[:num_samples]]
    page = visualize.decoding_order_html(token_texts, reveal, prompts=[text] * num_samples,
                                         num_steps=num_steps,
                                         title=f"Decoding order ({kwargs['alg']})")
    html_path = wd.path("decoding_order.html")
    with open(html_path, "w") as f:
      f.write(page)
    png_path = wd.path("decoding_order.png")
    visualize.decoding_order_png(reveal, png_path)
    print(f"decoding order: {html_path}, {png_path}")
