"""dcjax against transformers' Qwen2 run with a non-causal mask: load, save, logits."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

from dcjax import model as model_lib
from dcjax.model import hf
from dcjax.parallel import mesh as mesh_lib
from tests.hf_reference import bidirectional_logits, random_qwen2
from tests.trees import assert_trees_equal

TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  model = random_qwen2(seed=0)
  path = tmp_path_factory.mktemp("qwen2")
  model.save_pretrained(path, safe_serialization=True)
  return model, str(path)


def _tokens(b, l, seed=0, vocab=96):
  return np.random.default_rng(seed).integers(0, vocab, (b, l))


def test_logits_match_transformers(reference):
  model, path = reference
  config, params = hf.load_pretrained(path)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
  tokens = _tokens(3, 17)
  ours = np.asarray(model_lib.apply(config, params, tokens))
  theirs = bidirectional_logits(model, tokens)
  assert np.abs(ours - theirs).max() < TOL
  # Bidirectional: the first position's logits depend on the last token.
  changed = tokens.copy()
  changed[:, -1] = (changed[:, -1] + 1) % 96
  assert np.abs(np.asarray(model_lib.apply(config, params, changed))[:, 0] - ours[:, 0]).max() > 1e-3


@pytest.mark.slow
def test_left_padded_batch_matches_on_real_rows(reference):
  model, path = reference
  config, params = hf.load_pretrained(path)
  tokens = _tokens(3, 12, seed=1)
  keep = np.ones((3, 12), bool)
  keep[0, :5] = False
  keep[1, :1] = False
  positions = np.where(keep, np.cumsum(keep, axis=1) - 1, 1)  # docs/model.md, written out here
  ours = np.asarray(model_lib.apply(config, params, tokens, attention_mask=keep))
  theirs = bidirectional_logits(model, tokens, keep=keep, positions=positions)
  assert np.isfinite(ours).all()  # pad query rows are fully masked and must stay finite
  assert np.abs(ours[keep] - theirs[keep]).max() < TOL
  # A padded row equals the same prompt unpadded.
  alone = np.asarray(model_lib.apply(config, params, tokens[:1, 5:]))
  assert np.abs(ours[0, 5:] - alone[0]).max() < TOL


@pytest.mark.slow
def test_dcjax_save_loads_in_transformers(tmp_path):
  config = model_lib.ModelConfig(vocab_size=80, hidden_size=48, intermediate_size=96,
                                 num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8,
                                 rope_theta=5e4, initializer_range=0.2, mask_token_id=79,
                                 pad_token_id=0, eos_token_id=0)
  params = model_lib.init_params(config, jax.random.key(3))
  params["layers"]["self_attn"]["q_proj"]["bias"] += 0.3  # nonzero biases exercise the bias path
  params["layers"]["self_attn"]["k_proj"]["bias"] -= 0.2
  hf.save_pretrained(config, params, str(tmp_path))
  theirs_model = Qwen2ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                  dtype=torch.float32).eval()
  tokens = _tokens(2, 11, seed=2, vocab=80)
  ours = np.asarray(model_lib.apply(config, params, tokens))
  assert np.abs(ours - bidirectional_logits(theirs_model, tokens)).max() < TOL
  # Round trip is exact.
  config2, params2 = hf.load_pretrained(str(tmp_path))
  assert config2.mask_token_id == 79 and config2.num_layers == 3
  assert_trees_equal(params2, params)


def test_sharded_checkpoint_loads_into_mesh(tmp_path, reference):
  _, path = reference
  config, params = hf.load_pretrained(path)
  hf.save_pretrained(config, params, str(tmp_path), max_shard_bytes=40_000)
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  files = set(index["weight_map"].values())
  assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  config2, sharded = hf.load_pretrained(str(tmp_path), mesh=mesh)
  expected = model_lib.param_shardings(config2, mesh)
  assert jax.tree.structure(expected) == jax.tree.structure(sharded)
  for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True):
    assert got.sharding.is_equivalent_to(want, got.ndim)
  assert_trees_equal(sharded, params)


def test_bfloat16_load(reference):
  model, path = reference
  config, params = hf.load_pretrained(path, dtype="bfloat16")
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
  tokens = _tokens(2, 9, seed=4)
  ours = np.asarray(model_lib.apply(config, params, tokens).astype("float32"))
  theirs = bidirectional_logits(model, tokens)
  assert np.abs(ours - theirs).max() < 0.1 * np.abs(theirs).max()
