"""`mode="export"`: a workdir's orbax checkpoint as a Hugging Face directory (docs/checkpoints.md).

  python -m dcjax.main --config C --workdir W --config.mode=export --config.export_dir=OUT \\
      [--config.export_step=N]    # -1 (default): the newest step

Restores only the policy params of the step (a train TrainState or a GRPO RLState) into their
shardings on the mesh; `hf.save_pretrained` then gathers one tensor at a time and process 0
writes safetensors shards of at most 5 GB (with an index above one shard). OUT gets:

- `config.json`: the Qwen2 layout transformers 5 reads (`model_type` "qwen2"), plus
  `auto_map` for Dream's remote code (`configuration_dream.DreamConfig`,
  `modeling_dream.DreamModel`), used only with `trust_remote_code=True` and those files copied
  in from a Dream / DiffuCoder release;
- the tokenizer the run used: a Hugging Face tokenizer's files, or a sentencepiece model as
  `tokenizer.model` (read by dcjax and sentencepiece, not by transformers' AutoTokenizer),
  and `tokenizer_config.json` with the ChatML `chat_template`, the special tokens and
  `dcjax_special_ids` {mask, pad, eos, bos, chat_end, im_start};
- `generation_config.json`: the sampler defaults (`config.sampler` when the config has one,
  else dcjax's `sampler_section()`), in `dcjax.diffusion.sampler.generate`'s names, which are
  Dream's `diffusion_generate` names where both have the field (max_new_tokens, steps, alg,
  temperature, top_p, top_k, alg_temp, eps; null = off), plus dcjax's block_length, threshold,
  cache, cache_refresh_every, the token ids, and `do_sample` (temperature > 0) for
  transformers' GenerationConfig.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax

from dcjax import workdir as workdir_lib
from dcjax.config import ConfigError
from dcjax.data import tokenizer as tokenizer_lib
from dcjax.diffusion.sampler_config import sampler_kwargs, sampler_section, validate_sampler
from dcjax.model import hf
from dcjax.parallel import mesh as mesh_lib
from dcjax.train import handoff

AUTO_MAP = {"AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel"}
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt")
TOKENIZER_CONFIG, GENERATION_CONFIG = "tokenizer_config.json", "generation_config.json"
# Tokenizer.apply_chat_template (ChatML, the default system prompt when none is given).
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + tokenizer_lib.DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def validate(config) -> None:
  out = config.get("export_dir") or ""
  if not out:
    raise ConfigError("config.export_dir is empty: mode=export needs the directory to write "
                      "the Hugging Face checkpoint to")
  if workdir_lib.is_remote(out):
    raise ConfigError(f"config.export_dir={out!r} must be a local directory (copy it to a "
                      "bucket afterwards)")
  step = config.get("export_step", -1)
  if not isinstance(step, int) or isinstance(step, bool) or step < -1:
    raise ConfigError(f"config.export_step={step!r} must be a checkpoint step >= 0, or -1 for "
                      "the newest")
  if "sampler" in config:
    validate_sampler(config.sampler)


def special_ids(tok, model_config) -> dict:
  return dict(mask=tok.mask_id, pad=tok.pad_id, eos=tok.eos_id, bos=model_config.bos_token_id,
              chat_end=tok.chat_end_id, im_start=tok.im_start_id)


def write_tokenizer(tok, model_config, out: str) -> None:
  """The tokenizer's files and a tokenizer_config.json with the template and special ids."""
  path = tok.path
  extra = {}
  if os.path.isdir(path):
    for name in HF_TOKENIZER_FILES:
      if os.path.exists(os.path.join(path, name)):
        shutil.copyfile(os.path.join(path, name), os.path.join(out, name))
    cfg_file = os.path.join(path, TOKENIZER_CONFIG)
    if os.path.exists(cfg_file):
      with open(cfg_file) as f:
        extra = json.load(f)
  else:
    shutil.copyfile(path, os.path.join(out, tokenizer_lib.SP_IN_DIR))
  ids = special_ids(tok, model_config)
  token = {k: (None if v is None else tok.decode([v])) for k, v in ids.items()}
  cfg = {**extra, "mask_token": token["mask"], "pad_token": token["pad"],
         "eos_token": token["eos"], "bos_token": token["bos"],
         "chat_end_token": token["chat_end"], "im_start_token": token["im_start"],
         "dcjax_special_ids": ids}
  cfg.setdefault("chat_template", CHAT_TEMPLATE)
  with open(os.path.join(out, TOKENIZER_CONFIG), "w") as f:
    json.dump(cfg, f, indent=2)


def generation_config(section, tok, model_config) -> dict:
  """The sampler's `generate` keyword arguments (null = off) and the token ids."""
  kwargs = sampler_kwargs(section)
  return {**kwargs, "do_sample": kwargs["temperature"] > 0, "mask_token_id": tok.mask_id,
          "pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id,
          "bos_token_id": model_config.bos_token_id}


def add_auto_map(out: str) -> None:
  path = os.path.join(out, hf.CONFIG_FILE)
  with open(path) as f:
    raw = json.load(f)
  raw["auto_map"] = AUTO_MAP
  with open(path, "w") as f:
    json.dump(raw, f, indent=2)


def export(config, workdir: "str | workdir_lib.Workdir", mesh=None) -> handoff.Source:
  """Writes config.export_dir from the workdir's checkpoint; returns the source it read."""
  validate(config)
  wd = workdir_lib.resolve(workdir)
  step = int(config.get("export_step", -1))
  source = handoff.open_source(wd.root, "--workdir" if step < 0 else "config.export_step",
                               step=None if step < 0 else step)
  tok_path = config.get("tokenizer_path") or source.tokenizer_path
  if not tok_path:
    raise ConfigError(f"checkpoint {source.where} records no tokenizer and the workdir has no "
                      "tokenizer/sp*.model; set config.tokenizer_path to the one the run used")
  tok = tokenizer_lib.load_tokenizer(tok_path)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
  params = source.load_params(source.model_config, mesh)
  out = os.path.abspath(config.export_dir)
  hf.save_pretrained(source.model_config, params, out)  # gathers per tensor; process 0 writes
  if jax.process_index() == 0:
    add_auto_map(out)
    write_tokenizer(tok, source.model_config, out)
    section = config.sampler if "sampler" in config else sampler_section()
    with open(os.path.join(out, GENERATION_CONFIG), "w") as f:
      json.dump(generation_config(section, tok, source.model_config), f, indent=2)
  return source


def run(config, workdir: "str | workdir_lib.Workdir") -> None:
  start = time.perf_counter()
  try:
    source = export(config, workdir)
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  if jax.process_index() == 0:
    print(f"exported step {source.step} of {source.workdir} to "
          f"{os.path.abspath(config.export_dir)} in {time.perf_counter() - start:.1f}s",
          flush=True)
