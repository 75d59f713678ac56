"""Bad checkpoint directories: each error names the file or tensor and the expected shape."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dcjax.model import hf
from tests.hf_reference import random_qwen2


@pytest.fixture
def ckpt(tmp_path):
  random_qwen2(seed=1).save_pretrained(tmp_path, safe_serialization=True)
  return tmp_path


def _rewrite(ckpt, edit):
  file = ckpt / "model.safetensors"
  tensors = dict(load_file(str(file)))
  edit(tensors)
  save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_config(tmp_path):
  with pytest.raises(hf.CheckpointError, match=r"config\.json not found"):
    hf.load_pretrained(str(tmp_path))


def test_missing_weights_file(ckpt):
  os.remove(ckpt / "model.safetensors")
  with pytest.raises(hf.CheckpointError, match=r"neither model\.safetensors nor "
                     r"model\.safetensors\.index\.json"):
    hf.load_pretrained(str(ckpt))


def test_unknown_model_type(ckpt):
  cfg = json.loads((ckpt / "config.json").read_text())
  cfg["model_type"] = "llama"
  (ckpt / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match=r"config\.json: model_type='llama' is not supported"):
    hf.load_pretrained(str(ckpt))


def test_dream_model_type_is_accepted(ckpt):
  cfg = json.loads((ckpt / "config.json").read_text())
  cfg.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=95)
  (ckpt / "config.json").write_text(json.dumps(cfg))
  config, _ = hf.load_pretrained(str(ckpt))
  assert config.mask_token_id == 95


def test_missing_tensor(ckpt):
  _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointError,
                     match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing "
                     r"\(expected shape \(112, 64\)\)"):
    hf.load_pretrained(str(ckpt))


def test_extra_tensor(ckpt):
  _rewrite(ckpt, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((2, 2),
                                                                                  np.float32)}))
  with pytest.raises(hf.CheckpointError,
                     match=r"unexpected tensors \['model\.layers\.2\.mlp\.up_proj\.weight'\]"):
    hf.load_pretrained(str(ckpt))


def test_shape_mismatch(ckpt):
  _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.bias":
                                     np.zeros((48,), np.float32)}))
  with pytest.raises(hf.CheckpointError,
                     match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.bias "
                     r"has shape \(48,\), expected \(32,\)"):
    hf.load_pretrained(str(ckpt))


def test_index_lists_missing_shard(ckpt):
  index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
  (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(hf.CheckpointError, match=r"model-00002-of-00002\.safetensors, which does "
                     r"not exist"):
    hf.load_pretrained(str(ckpt))


@pytest.mark.parametrize("keep_bytes", [100, None], ids=["header", "data"])
def test_truncated_safetensors_names_the_file(ckpt, keep_bytes):
  file = ckpt / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:keep_bytes or len(data) // 2])
  with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: cannot read") as info:
    hf.load_pretrained(str(ckpt))
  assert str(file) in str(info.value) and "truncated or corrupt" in str(info.value)
