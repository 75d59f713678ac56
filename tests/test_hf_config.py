"""config.json layouts as transformers 5 writes them: load -> logits, export -> transformers.

Every checkpoint and config here is written by transformers' own `save_pretrained`; error
cases change one field of such a file.
"""

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dcjax import model as model_lib
from dcjax.model import hf, hf_config
from tests.hf_reference import TINY, bidirectional_logits, random_qwen2

TOL = 1e-4

# theta in {1e4, 1e6}; tied and untied; head_dim != hidden / heads; GQA ratios 1, 2 and 7.
GRID = {
    "theta1e4-untied-gqa2": dict(rope_theta=1e4),
    "theta1e6-tied-gqa1-headdim24": dict(rope_theta=1e6, tie_word_embeddings=True,
                                         num_key_value_heads=4, head_dim=24),
    "theta1e6-untied-gqa7-headdim12": dict(rope_theta=1e6, hidden_size=56,
                                           num_attention_heads=7, num_key_value_heads=1,
                                           head_dim=12),
    "theta1e6-tied-gqa2": dict(rope_theta=1e6, tie_word_embeddings=True),
}


def _padded_batch(seed=0):
  tokens = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (3, 13))
  keep = np.ones(tokens.shape, bool)
  keep[1, :4] = False
  positions = np.where(keep, np.cumsum(keep, axis=1) - 1, 1)
  return tokens, keep, positions


@pytest.mark.slow
@pytest.mark.parametrize("overrides", GRID.values(), ids=GRID.keys())
def test_transformers_checkpoint_loads_and_exports_with_its_numerics(overrides, tmp_path):
  reference = random_qwen2(seed=3, **overrides)
  reference.save_pretrained(tmp_path / "hf")
  written = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == (
      overrides["rope_theta"])  # transformers 5's layout, which dcjax used to ignore

  config, params = hf.load_pretrained(str(tmp_path / "hf"))
  assert config.rope_theta == overrides["rope_theta"]
  assert config.head_dim == overrides.get("head_dim", config.hidden_size // config.num_heads)
  tokens, keep, positions = _padded_batch()
  theirs = bidirectional_logits(reference, tokens, keep=keep, positions=positions)
  ours = np.asarray(model_lib.apply(config, params, tokens, attention_mask=keep))
  assert np.abs(ours[keep] - theirs[keep]).max() < TOL

  hf.save_pretrained(config, params, str(tmp_path / "out"))
  exported = Qwen2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
  exported.config._attn_implementation = "eager"  # pylint: disable=protected-access
  again = bidirectional_logits(exported, tokens, keep=keep, positions=positions)
  assert np.abs(again[keep] - theirs[keep]).max() < TOL
  # transformers 5 and a legacy top-level reader agree on theta, tying and head_dim.
  legacy = json.loads((tmp_path / "out" / "config.json").read_text())
  assert legacy["rope_theta"] == exported.config.rope_parameters["rope_theta"] == (
      overrides["rope_theta"])
  assert legacy["tie_word_embeddings"] is exported.config.tie_word_embeddings is False
  assert legacy["head_dim"] == exported.model.layers[0].self_attn.head_dim == config.head_dim
  assert hf.read_config(str(tmp_path / "out"))[0] == config


def _written_config(tmp_path, model_type="qwen2", **fields):
  """A config.json written by transformers' Qwen2Config, then edited field by field."""
  Qwen2Config(**{**TINY, "rope_theta": 5e5}).save_pretrained(tmp_path)
  path = tmp_path / "config.json"
  raw = json.loads(path.read_text())
  raw["model_type"] = model_type
  for key, value in fields.items():
    if value is _DELETE:
      raw.pop(key, None)
    else:
      raw[key] = value
  path.write_text(json.dumps(raw))
  return str(tmp_path)


_DELETE = object()


def test_legacy_top_level_rope_theta_is_read(tmp_path):
  path = _written_config(tmp_path, rope_parameters=_DELETE, rope_theta=1e6, rope_scaling=None)
  assert hf.read_config(path)[0].rope_theta == 1e6
  path = _written_config(tmp_path, rope_parameters=_DELETE,
                         rope_scaling={"type": "default", "rope_theta": 2e5})
  assert hf.read_config(path)[0].rope_theta == 2e5


def test_absent_fields_take_transformers_defaults(tmp_path):
  path = _written_config(tmp_path, rope_parameters=_DELETE, rms_norm_eps=_DELETE,
                         max_position_embeddings=_DELETE, num_key_value_heads=_DELETE)
  config = hf.read_config(path)[0]
  assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings,
          config.num_kv_heads) == (Qwen2Config().rope_parameters["rope_theta"],
                                   Qwen2Config().rms_norm_eps,
                                   Qwen2Config().max_position_embeddings, config.num_heads)
  dream = hf.read_config(_written_config(tmp_path, "Dream", pad_token_id=_DELETE,
                                        vocab_size=152064))[0]
  assert (dream.mask_token_id, dream.pad_token_id) == (151666, 151643)  # DreamConfig's


@pytest.mark.parametrize("fields, match", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
     r"rope_parameters has fields \['factor'\]"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6}),
     r"rope_parameters\.rope_type='dynamic' is not supported"),
    (dict(rope_scaling={"type": "yarn", "rope_theta": 1e6}),
     r"rope_scaling\.rope_type='yarn' is not supported"),
    (dict(rope_theta=1e4), r"rope_parameters\.rope_theta=500000\.0 and rope_theta=10000\.0 disagree"),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=_DELETE),
     r"use_sliding_window=true with sliding_window=8 on layers >= max_window_layers=1"),
    (dict(layer_types=["full_attention", "sliding_attention"]),
     r"layer_types holds \['sliding_attention'\]"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'; only 'silu'"),
    (dict(quantization_config={"bits": 4}), r"fields \['quantization_config'\] are not understood"),
    (dict(num_hidden_layers=0), r"num_hidden_layers=0 must be a positive integer"),
])
def test_numerics_changing_fields_are_errors_naming_field_and_file(tmp_path, fields, match):
  path = _written_config(tmp_path, **fields)
  with pytest.raises(hf.CheckpointError, match=match) as info:
    hf.read_config(path)
  assert str(tmp_path / "config.json") in str(info.value)


def test_dream_head_dim_must_be_derivable(tmp_path):
  with pytest.raises(hf.CheckpointError, match=r"head_dim=24 but Dream's attention always uses"):
    hf.read_config(_written_config(tmp_path, "Dream", head_dim=24))
  config = hf.read_config(_written_config(tmp_path, head_dim=24))[0]
  with pytest.raises(ValueError, match=r"export as model_type='qwen2'"):
    hf_config.hf_config_dict(config, "Dream")


def test_unused_sliding_window_fields_are_accepted(tmp_path):
  # Qwen2.5 configs carry sliding_window with use_sliding_window false: full attention.
  path = _written_config(tmp_path, use_sliding_window=False, sliding_window=131072)
  assert hf.read_config(path)[0].num_layers == TINY["num_hidden_layers"]
