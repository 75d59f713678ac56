"""Config validation names the bad field; the entry point runs and reports errors."""

import os
import re
import subprocess
import sys

import pytest

from dcjax import config as config_lib
from dcjax.parallel import mesh as mesh_lib
from configs import (diffucoder_7b, diffucoder_7b_adapt, diffucoder_7b_sft, small,
                     small_pretrain, tiny)
from dcjax.train import train_config
from tests.conftest import REPO


@pytest.mark.parametrize("module", [tiny, small, diffucoder_7b])
def test_shipped_configs_validate(module):
  config = module.get_config()
  config_lib.validate(config)
  assert module.__doc__ and "python -m dcjax.main --config configs/" in module.__doc__


# Flags of the docstrings' alternative commands: the previous stage's workdir instead of hf_dir,
# an ahead-of-time compile.
ALTERNATIVES = ("init_from", "checkpoint_dir", "mode", "compile_topology")


def _documented_overrides(module):
  """{"data.paths": "/mnt/...", ...}: the --config.X=Y flags of the docstring's command line."""
  flags = re.findall(r"--config\.([\w.]+)=(\S+)", module.__doc__)
  return {field: value.strip("'\"") for field, value in flags if field not in ALTERNATIVES}


@pytest.mark.parametrize("module,kind,seq_len,micro_batches,anneal_steps,required", [
    (diffucoder_7b_adapt, "pretrain", 4096, 4, 10_000, ("hf_dir", "data.tokenizer", "data.paths")),
    (diffucoder_7b_sft, "sft", 2048, 2, 0, ("hf_dir", "data.paths")),
    (small_pretrain, "pretrain", 1024, 1, 0, ()),
])
def test_training_configs_validate_with_their_documented_command(
    module, kind, seq_len, micro_batches, anneal_steps, required):
  """The docstring's command lines fill the paths a config leaves empty; then it validates."""
  overrides = _documented_overrides(module)
  assert set(required) <= set(overrides), overrides
  config = module.get_config()
  assert config.mode == "train"
  for field in required:  # left empty: without the command line's value, validation stops
    section, _, name = field.rpartition(".")
    target = config[section] if section else config
    assert name in target and target[name] == "", field
  if "data.paths" in required:
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.paths is empty"):
      config_lib.validate(config)
  else:  # small_pretrain: the first command has no flags (stdlib corpus); the docstring's
    config_lib.validate(config)  # --config.data.source/paths example must validate too
    assert (config.data.source, overrides["data.source"]) == ("stdlib", "array_record")
  for field, value in overrides.items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  config_lib.validate(config)

  t, d = config.train, config.data
  assert (d.kind, d.seq_len, t.micro_batches) == (kind, seq_len, micro_batches)
  assert t.loss.anneal_steps == anneal_steps
  assert t.batch_size % t.micro_batches == 0 and 0 < t.warmup_steps < t.steps
  assert 0 < t.lr <= 1e-3 and t.eval_every <= t.steps
  # The model section is what hf_dir's config.json must match; it is valid on its own.
  model = config_lib.model_config(config)
  model.validate("config.model")
  train_config.check_seq_len(config, model, "config.model")
  if module is not small_pretrain:  # DiffuCoder-7B: <|mask|> is a spare row of Qwen2.5's vocab
    assert config.hf_dir.startswith("/path/to/") and config.data.paths.startswith("/mnt/")
    assert (model.num_layers, model.hidden_size, model.mask_token_id) == (28, 3584, 151666)
    assert model.dtype == "bfloat16" and model.param_dtype == "float32"
    assert config.mesh.to_dict() == {"data": 1, "fsdp": -1, "tensor": 1}


@pytest.mark.parametrize("field,value,message", [
    ("mode", "fly", r"config.mode='fly' is not one of"),
    ("mesh.fsdp", 0, r"config.mesh.fsdp=0 must be a positive integer or -1"),
    ("model.num_kv_heads", 3, r"config.model.num_kv_heads=3 must divide config.model.num_heads=4"),
    ("model.hidden_size", -8, r"config.model.hidden_size=-8 must be a positive integer"),
    ("seed", "x", r"config.seed='x' must be an integer"),
])
def test_validation_names_the_field(field, value, message):
  config = tiny.get_config()
  config.mode = "inspect"
  section, _, name = field.rpartition(".")
  target = config[section] if section else config
  with target.ignore_type():
    target[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


@pytest.mark.parametrize("fields,message", [
    (dict(num_processes=2, process_id=0), r"coordinator_address is empty \(expected host:port\)"),
    (dict(coordinator_address="10.0.0.2"), r"coordinator_address='10.0.0.2' must be host:port"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0),
     r"config.distributed.num_processes=0 must be >= 1"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2),
     r"config.distributed.process_id=2 must be in \[0, 2\)"),
])
def test_distributed_fields_are_checked_together(fields, message):
  config = tiny.get_config()
  config.distributed.update(fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_distributed_initialize_only_when_wanted(monkeypatch):
  from dcjax.parallel import distributed  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0")  # a single-host TPU VM
  config = tiny.get_config()
  assert not distributed.initialize(config) and calls == []
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3")  # a v4-32 slice
  assert distributed.initialize(config) and calls == [{}]  # JAX reads the TPU metadata
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  config.distributed.update(dict(coordinator_address="10.0.0.2:8476", num_processes=4,
                                 process_id=3))
  assert distributed.initialize(config)
  assert calls[-1] == dict(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3)


def test_mesh_shape_fills_and_checks():
  assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert mesh_lib.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="not divisible by the fixed axes"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="holds 4 devices but 8 are available"):
    mesh_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)


def _main(tmp_path, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "dcjax.main", "--config", "configs/tiny.py", "--workdir",
       str(tmp_path), "--config.mode=inspect", *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_entry_point_inspects_the_tiny_model(tmp_path):
  result = _main(tmp_path, "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                 "--config.model.num_layers=3")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 2}" in result.stdout
  assert "(3, 128, 384)" in result.stdout  # the override reached the model
  assert "P(None, 'fsdp', 'tensor')" in result.stdout
  assert "finite=True" in result.stdout
  # The vocab/fsdp-sharded embedding lookup compiles without replicating its output.
  assert "Involuntary full rematerialization" not in result.stderr


def test_entry_point_reports_the_bad_field(tmp_path):
  result = _main(tmp_path, "--config.model.num_kv_heads=3")
  assert result.returncode != 0
  assert "config.model.num_kv_heads=3 must divide" in result.stderr
