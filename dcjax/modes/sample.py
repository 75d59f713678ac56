"""`mode="sample"`: load a model (`hf_dir`, a previous run's `checkpoint_dir`, or a random tiny
one), sample, print completions.

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
from dcjax.diffusion import decode, visualize
from dcjax.diffusion.loading import load_model_and_tokenizer
from dcjax.diffusion.sampler import generate
from dcjax.diffusion.sampler_config import sampler_kwargs, validate_sampler
from dcjax.parallel import mesh as mesh_lib
from dcjax.parallel import sharding
from dcjax.parallel.rules import MESH_AXES
from dcjax.train import handoff


def validate(config) -> None:
  """Checks config.sampler and the sample-mode fields; raises ConfigError naming the field."""
  if "sampler" not in config:
    raise ConfigError("config.sampler is missing (see configs/sample.py)")
  validate_sampler(config.sampler)
  if not isinstance(config.get("prompt"), str) or not config.prompt:
    raise ConfigError("config.prompt must be a non-empty string")
  if config.get("num_samples", 1) < 1:
    raise ConfigError(f"config.num_samples={config.num_samples} must be >= 1")


def run(config, workdir: "str | workdir_lib.Workdir") -> None:
  validate(config)
  wd = workdir_lib.resolve(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  model_config, params, tokenizer = load_model_and_tokenizer(
      config, mesh, handoff.from_config(config, "checkpoint_dir"))
  text = config.prompt
  if config.get("chat", False):
    text = decode.chat_prompt(tokenizer, text, assistant_prefix=config.get("assistant_prefix", ""))
  shards = int(np.prod([mesh.shape[a] for a in MESH_AXES[:2]]))
  batch = -(-int(config.get("num_samples", 1)) // shards) * shards
  ids, keep = decode.encode_left_padded(tokenizer, [text] * batch)
  kwargs = sampler_kwargs(config.sampler)
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
  generated = batch * kwargs["max_new_tokens"]
  log(f"{num_steps} steps ({full} full-canvas forwards), {seconds:.2f}s including compile, "
      f"{generated / seconds:.1f} tokens/s")

  p = ids.shape[1]
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
