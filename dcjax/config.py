"""Config schema shared by every mode, the mode registry, and validation that names the field.

A config is an `ml_collections.ConfigDict` from a file under `configs/` with:
  mode     which job runs (a key of MODES)
  seed     the root PRNG seed
  model    the fields of `dcjax.model.ModelConfig`
  mesh     {'data', 'fsdp', 'tensor'} sizes, one of them may be -1 (fills the rest)
  hf_dir   optional Hugging Face checkpoint directory to load instead of `model`
Modes add their own sections (train, data, sampler, eval, ...); a mode's module may
define `validate(config)` which runs before anything else.
"""

from __future__ import annotations

import importlib
from typing import Callable

import ml_collections

from dcjax.parallel import distributed
from dcjax.model.config import ModelConfig
from dcjax.parallel.rules import MESH_AXES

# mode name -> "module:function"; the function is `run(config, workdir) -> None`.
MODES = {
    "inspect": "dcjax.modes.inspect:run",
    "train": "dcjax.modes.train:run",
    "sample": "dcjax.modes.sample:run",
    "eval": "dcjax.modes.eval:run",
    "grpo": "dcjax.modes.grpo:run",
    "compile": "dcjax.modes.compile:run",
    "export": "dcjax.modes.export:run",
    "serve": "dcjax.modes.serve:run",
}


class ConfigError(ValueError):
  """A config field has a bad value; the message names the field."""


def resolve_mode(mode: str) -> tuple[Callable, Callable | None]:
  """Returns (run, validate or None) for a mode name."""
  if mode not in MODES:
    raise ConfigError(f"config.mode={mode!r} is not one of {sorted(MODES)}")
  module_name, fn_name = MODES[mode].split(":")
  module = importlib.import_module(module_name)
  return getattr(module, fn_name), getattr(module, "validate", None)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig of a full config (config.model)."""
  try:
    return ModelConfig.from_dict(config.model.to_dict())
  except TypeError as e:  # a missing required field
    raise ConfigError(f"config.model is incomplete: {e}") from None


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the shared fields; raises ConfigError naming the first bad one."""
  for name in ("mode", "seed", "mesh"):
    if name not in config:
      raise ConfigError(f"config.{name} is missing")
  if not isinstance(config.seed, int):
    raise ConfigError(f"config.seed={config.seed!r} must be an integer")
  for axis in MESH_AXES:
    if axis not in config.mesh:
      raise ConfigError(f"config.mesh.{axis} is missing (expected a size or -1)")
    size = config.mesh[axis]
    if not isinstance(size, int) or size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}={size!r} must be a positive integer or -1")
  try:
    distributed.validate(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not config.get("hf_dir"):
    if "model" not in config:
      raise ConfigError("config.model is missing and config.hf_dir is empty: nothing to build")
    try:
      model_config(config).validate("config.model")
    except ValueError as e:
      raise ConfigError(str(e)) from None
  profile_window(config)
  wandb = config.get("wandb")
  if wandb is not None and wandb.get("mode", "offline") not in WANDB_MODES:
    raise ConfigError(f"config.wandb.mode={wandb.mode!r} is not one of {WANDB_MODES}")
  check_model_source(config)
  _, mode_validate = resolve_mode(config.mode)
  if mode_validate is not None:
    mode_validate(config)


WANDB_MODES = ("offline", "online", "disabled")


def profile_window(config) -> tuple[int, int] | None:
  """config.profile_steps "START,END" -> (START, END), the steps [START, END) to trace;
  None when empty. ConfigError naming the field for anything else."""
  spec = config.get("profile_steps", "")
  if spec in ("", None):
    return None
  bad = ConfigError(f"config.profile_steps={spec!r} must be two integers 'START,END' with "
                    "0 <= START < END (steps [START, END) are traced), or '' for no trace")
  parts = spec.split(",") if isinstance(spec, str) else list(spec)
  if len(parts) != 2:
    raise bad
  try:
    start, end = (int(str(x).strip()) for x in parts)
  except ValueError:
    raise bad from None
  if not 0 <= start < end:
    raise bad
  return start, end


# Which modes read which model source besides hf_dir / config.model (docs/checkpoints.md).
_SOURCE_MODES = {"init_from": ("train", "grpo"),
                 "checkpoint_dir": ("sample", "eval", "serve")}


def check_model_source(config) -> None:
  """At most one of hf_dir / init_from / checkpoint_dir, and each only where it is read."""
  for field, modes in _SOURCE_MODES.items():
    value = config.get(field) or ""
    if not value:
      continue
    mode = config.get("mode")
    if mode not in modes:
      other = [f for f, m in _SOURCE_MODES.items() if mode in m]
      hint = f"; mode {mode!r} reads config.{other[0]}" if other else ""
      raise ConfigError(f"config.{field}={value!r} is read by mode {' / '.join(modes)} only, "
                        f"not config.mode={mode!r}{hint}")
    if config.get("hf_dir"):
      raise ConfigError(f"config.{field}={value!r} and config.hf_dir={config.hf_dir!r} are both "
                        f"set: the model comes from one of them; empty the other")


def base_config() -> ml_collections.ConfigDict:
  """Shared defaults that every file under configs/ starts from."""
  c = ml_collections.ConfigDict()
  c.mode = "inspect"
  c.seed = 0
  c.hf_dir = ""
  # docs/checkpoints.md: a previous run's orbax workdir "W" or "W:step" as the model (params
  # only, fresh optimiser, step 0; model config and tokenizer from that run) of train / grpo
  # (init_from) or of sample / eval (checkpoint_dir).
  c.init_from = ""
  c.checkpoint_dir = ""
  # mode=export: the workdir's checkpoint as a Hugging Face directory; step -1 = the latest.
  c.export_dir = ""
  c.export_step = -1
  # mode=sample: batch-sample a JSONL file instead of config.prompt (docs/serving.md); the
  # outputs go to outputs_file, or <workdir>/completions.jsonl when it is empty.
  c.prompts_file = ""
  c.outputs_file = ""
  # mode=serve (docs/serving.md): an OpenAI-compatible HTTP server over the compiled sampler;
  # batch_size, prompt_bucket and max_programs also shape mode=sample's prompts_file batches.
  c.serve = ml_collections.ConfigDict(dict(
      host="127.0.0.1",        # 0.0.0.0 serves every interface
      port=8000,               # 0: any free port (printed at start)
      model_name="",           # the id of /v1/models; empty: hf_dir's name, or "dcjax"
      batch_size=8,            # rows per compiled batch (rounded up to the data shards)
      batch_window_ms=10.0,    # how long the first request of a batch waits for others
      prompt_bucket=64,        # prompts are left-padded to a multiple of this
      max_prompt_tokens=1024,  # longer prompts get a 400
      max_tokens=512,          # largest max_tokens (and steps) a request may ask for
      max_request_rows=64,     # n x prompts of one request
      max_programs=16,         # distinct compiled sampler programs; 0 = no limit
      request_timeout_s=600.0,
      max_requests=0,          # stop after this many HTTP requests (tests, smoke runs); 0 = never
      warmup=True,             # compile the default program before accepting requests
  ))
  c.multihost = False  # True forces jax.distributed.initialize(); TPU pods are auto-detected.
  # Explicit multi-process setup (GPU clusters, several processes on one machine); empty
  # coordinator_address = auto-detect. See dcjax/parallel/distributed.py.
  c.distributed = ml_collections.ConfigDict(
      {"coordinator_address": "", "num_processes": 0, "process_id": -1})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # mode=compile (docs/compile.md): compile this config's programs for a TPU slice on any host.
  c.compile_topology = ""       # gcloud name: v4-N, v5p-N, v5litepod-N, v6e-N
  c.compile_num_slices = 1
  c.compile_prompt_len = 512    # prompt width the sample / eval sampler is compiled for
  c.compile_hbm_fraction = 0.9  # a program "fits" when its peak is at most this share of HBM
  # docs/runs.md: the resolved config is saved to <workdir>/config.json; a resume whose config
  # differs (outside a small allow-list) stops unless this is True.
  c.allow_config_change = False
  c.profile_steps = ""  # "START,END": a jax.profiler trace of steps [START, END) in <workdir>/profile
  # Weights & Biases beside TensorBoard and metrics.jsonl when project is set (pip install -e '.[wandb]').
  c.wandb = ml_collections.ConfigDict(
      {"project": "", "entity": "", "mode": "offline", "name": ""})
  c.model = ml_collections.ConfigDict(ModelConfig(
      vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
      num_kv_heads=1, head_dim=2).to_dict())
  return c
