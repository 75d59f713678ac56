"""`mode="sample"`: load a model (or build a random tiny one), sample, print completions.

Writes `completions.jsonl` to the workdir, and with `config.visualize` the decoding-order
pictures `decoding_order.html` and `decoding_order.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
from ml_collections import config_dict
import numpy as np

from dcjax import config as config_lib
from dcjax import workdir as workdir_lib
from dcjax.diffusion import decode, visualize
from dcjax.diffusion.sampler import CACHE_MODES, generate
from dcjax.diffusion.schedule import ALGS
from dcjax.parallel import mesh as mesh_lib
from dcjax.parallel import sharding
from dcjax.parallel.rules import MESH_AXES

ConfigError = config_lib.ConfigError


def sampler_section(**overrides) -> config_dict.ConfigDict:
  """`config.sampler` with every `generate` option (Dream's defaults), for configs/*.py."""
  section = config_dict.ConfigDict(dict(
      max_new_tokens=64,
      steps=64,
      alg="entropy",  # origin | maskgit_plus | topk_margin | entropy
      temperature=0.2,
      top_p=config_dict.placeholder(float),  # e.g. 0.95
      top_k=config_dict.placeholder(int),
      alg_temp=0.0,  # > 0 samples the revealed positions
      eps=1e-3,
      block_length=config_dict.placeholder(int),  # LLaDA blocks, e.g. 32
      threshold=config_dict.placeholder(float),  # Fast-dLLM, e.g. 0.9
      cache=config_dict.placeholder(str),  # prefix | dual
      cache_refresh_every=0,  # 0: recompute the canvas once per block
  ))
  section.update(overrides)
  return section


def sampler_kwargs(sampler_config) -> dict:
  """`generate` keyword arguments from `config.sampler` (empty strings and 0 mean unset)."""
  s = sampler_config
  cache = s.get("cache") or None
  alg_temp = s.get("alg_temp")
  return dict(max_new_tokens=int(s.max_new_tokens), steps=int(s.steps), alg=s.alg,
              temperature=float(s.temperature), top_p=s.get("top_p"), top_k=s.get("top_k"),
              alg_temp=alg_temp if alg_temp else None, eps=float(s.eps),
              block_length=s.get("block_length"), threshold=s.get("threshold"), cache=cache,
              cache_refresh_every=int(s.get("cache_refresh_every", 0)))


def validate(config) -> None:
  """Checks config.sampler and the sample-mode fields; raises ConfigError naming the field."""
  if "sampler" not in config:
    raise ConfigError("config.sampler is missing (see configs/sample.py)")
  s = config.sampler
  for name in ("max_new_tokens", "steps"):
    if not isinstance(s.get(name), int) or s.get(name) < 1:
      raise ConfigError(f"config.sampler.{name}={s.get(name)!r} must be a positive integer")
  if s.alg not in ALGS:
    raise ConfigError(f"config.sampler.alg={s.alg!r} is not one of {ALGS}")
  if s.temperature < 0:
    raise ConfigError(f"config.sampler.temperature={s.temperature} must be >= 0")
  if (s.get("cache") or None) not in CACHE_MODES:
    raise ConfigError(f"config.sampler.cache={s.cache!r} is not one of {CACHE_MODES}")
  bl = s.get("block_length")
  if bl is not None and (bl < 1 or s.max_new_tokens % bl):
    raise ConfigError(f"config.sampler.block_length={bl} must divide "
                      f"config.sampler.max_new_tokens={s.max_new_tokens}")
  num_blocks = 1 if bl is None else s.max_new_tokens // bl
  if s.get("threshold") is None and s.steps % num_blocks:
    raise ConfigError(f"config.sampler.steps={s.steps} must be a multiple of the number of "
                      f"blocks ({num_blocks})")
  if s.get("threshold") is not None and s.alg == "origin":
    raise ConfigError("config.sampler.threshold needs a confidence alg, not 'origin'")
  if not isinstance(config.get("prompt"), str) or not config.prompt:
    raise ConfigError("config.prompt must be a non-empty string")
  if config.get("num_samples", 1) < 1:
    raise ConfigError(f"config.num_samples={config.num_samples} must be >= 1")


def load_model_and_tokenizer(config, mesh):
  """(ModelConfig, params, tokenizer): a Hugging Face checkpoint directory, or without
  `hf_dir` a random model from config.model with the byte-level fallback tokenizer."""
  if config.get("hf_dir"):
    from dcjax.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    from dcjax.model.hf import load_pretrained  # pylint: disable=import-outside-toplevel
    model_config, params = load_pretrained(config.hf_dir, dtype=config.model.param_dtype,
                                           mesh=mesh, compute_dtype=config.model.dtype)
    tokenizer = load_tokenizer(config.get("tokenizer_path") or config.hf_dir)
  else:
    tokenizer = decode.ByteTokenizer()
    model_config = config_lib.model_config(config)
    if model_config.vocab_size < tokenizer.vocab_size:
      raise ConfigError(f"config.model.vocab_size={model_config.vocab_size} is smaller than the "
                        f"byte tokenizer's {tokenizer.vocab_size}")
    params = sharding.init_params(model_config, jax.random.key(config.seed), mesh)
  if model_config.mask_token_id != tokenizer.mask_id:
    model_config = dataclasses.replace(model_config, mask_token_id=tokenizer.mask_id)
  return model_config, params, tokenizer


def run(config, workdir: "str | workdir_lib.Workdir") -> None:
  validate(config)
  wd = workdir_lib.resolve(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  model_config, params, tokenizer = load_model_and_tokenizer(config, mesh)
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
