"""The train step: sharded == single device, k micro-batches == one batch, the tiny run learns."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from dcjax.data import pipeline
from dcjax.diffusion import forward_process as fp
from dcjax.diffusion import losses
from dcjax.model.config import ModelConfig
from dcjax.parallel import mesh as mesh_lib
from dcjax import model as model_lib
from dcjax.modes import train as loop
from dcjax.train import optim
from dcjax.train import state as state_lib
from dcjax.train import step as step_lib
from tests.trees import assert_trees_close, assert_trees_equal

MODEL = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10_000.0,
                    mask_token_id=4, pad_token_id=1, eos_token_id=1)
TRAIN = ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=1, steps=10, end_lr_ratio=0.1,
                                       grad_clip=1.0, b1=0.9, b2=0.95, adam_eps=1e-8,
                                       weight_decay=0.1))
LOSS = losses.LossConfig(noise=fp.NoiseConfig(anneal_steps=3, truncate_prob=0.3),
                         document_mask=True)


def _batch(b=8, l=16, seed=0):
  rng = np.random.default_rng(seed)
  segments = np.sort(rng.integers(1, 4, (b, l)), axis=1).astype(np.int32)
  positions = np.zeros((b, l), np.int32)
  for r in range(b):
    for i in range(1, l):
      positions[r, i] = 0 if segments[r, i] != segments[r, i - 1] else positions[r, i - 1] + 1
  return dict(tokens=rng.integers(5, 96, (b, l)).astype(np.int32), segment_ids=segments,
              positions=positions, prompt_mask=np.zeros((b, l), bool))


@functools.lru_cache(maxsize=None)
def _host_params():
  """One random init shared by every mesh (placed into each mesh's shardings)."""
  return jax.device_get(model_lib.init_params(MODEL, jax.random.key(0)))


MESHES = {"one": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
          "fsdp_tensor": ({"data": 1, "fsdp": 4, "tensor": 2}, 8)}


@functools.lru_cache(maxsize=None)
def _run_steps(mesh_name, micro_batches=1, steps=2, loss_cfg=LOSS):
  """(params, metrics per step) after `steps` steps on a named mesh (cached across tests)."""
  shape, devices = MESHES[mesh_name]
  mesh = mesh_lib.make_mesh(shape, devices=jax.devices()[:devices])
  tx, schedule = optim.make_optimizer(TRAIN, TRAIN.steps)
  params = _host_params()
  abstract = state_lib.abstract_state(jax.eval_shape(lambda: params), tx)
  shardings = state_lib.state_shardings(
      abstract, model_lib.param_shardings(MODEL, mesh), tx, mesh)
  state = state_lib.init_state(jax.device_put(params, shardings.params), tx, 0, shardings)
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(MODEL, loss_cfg, tx, schedule, micro_batches=micro_batches),
      shardings, {k: pipeline.batch_sharding(mesh) for k in pipeline.BATCH_KEYS},
      NamedSharding(mesh, PartitionSpec()))
  history = []
  with jax.set_mesh(mesh):
    for i in range(steps):
      state, metrics = fn(state, pipeline.to_global(_batch(seed=i), mesh))
      history.append({k: float(v) for k, v in metrics.items()})
  return jax.device_get(state.params), history


@pytest.mark.slow
def test_sharded_step_equals_single_device():
  params_one, hist_one = _run_steps("one")
  params_eight, hist_eight = _run_steps("fsdp_tensor")
  assert len(hist_one) == len(hist_eight) == 2
  for a, b in zip(hist_one, hist_eight):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["targets"] == b["targets"]  # identical masks on any layout
    assert a["nonfinite"] == b["nonfinite"] == 0.0
  assert_trees_close(params_eight, params_one, rtol=2e-5, atol=2e-6)
  assert hist_one[1]["loss"] != hist_one[0]["loss"]


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
  # 8 rows in 2 micro-batches of 4 rows, each spread over the 4 fsdp shards.
  params_big, hist_big = _run_steps("fsdp_tensor", micro_batches=1)
  params_micro, hist_micro = _run_steps("fsdp_tensor", micro_batches=2)
  assert len(hist_big) == len(hist_micro) == 2
  for a, b in zip(hist_big, hist_micro):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
  assert_trees_close(params_micro, params_big, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_tiny_default_loss_falls(tmp_path):
  config = tiny.get_config()
  config.train.update(dict(steps=30, batch_size=8, warmup_steps=3, lr=4e-3, log_every=10,
                           eval_every=30, eval_batches=1, sample_new_tokens=0))
  config.data.update(dict(seq_len=96, tokenizer_train_chars=1_000_000, shuffle_window=256))
  config.checkpoint.interval = 1000
  ce = []
  result = loop.train(config, str(tmp_path), hooks=[lambda step, m: ce.append(m["ce_masked"])])
  assert result["stopped"] == "completed" and result["steps_done"] == 30
  first, last = np.mean(ce[:3]), np.mean(ce[-5:])
  assert first > 7.0            # ~ln(2048) at initialisation
  assert last < first - 1.0, (first, last)
  assert result["eval_metrics"]["ce_masked"] < first - 1.0
  assert (tmp_path / "metrics.jsonl").exists()
  assert (tmp_path / "checkpoints" / "30").is_dir()


@pytest.mark.slow
def test_initialises_from_a_hugging_face_checkpoint(tmp_path):
  """hf_dir weights are the starting point: one AdamW step from them, checked by hand."""
  import os
  import sysconfig

  from dcjax.config import base_config
  from dcjax.data import tokenizer as tokenizer_lib
  from dcjax.data import sources
  from dcjax.model import hf
  from dcjax.train.train_config import add_train_sections

  json_dir = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  tok_path = str(tmp_path / "sp.model")
  texts = [sources.StdlibSource(json_dir)[i]["text"] for i in range(4)]
  tokenizer_lib.train_sentencepiece(texts, 512, tok_path)
  model = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=10_000.0)  # no mask id
  params = model_lib.init_params(model, jax.random.key(7))
  hf.save_pretrained(model, params, str(tmp_path / "hf"))

  c = add_train_sections(base_config())
  # config.model keeps only its runtime fields (dtype...): the architecture is config.json
  c.hf_dir = str(tmp_path / "hf")
  lr = 1e-4  # no warmup: the one step runs at lr, far below the ~0.02 between random inits
  c.train.update(dict(steps=1, batch_size=8, warmup_steps=0, lr=lr, eval_batches=0,
                      sample_new_tokens=0))
  wd = float(c.train.weight_decay)
  c.data.update(dict(stdlib_root=json_dir, eval_docs=1, seq_len=32, shuffle_window=0,
                     tokenizer=tok_path))
  result = loop.train(c, str(tmp_path / "run"))
  assert result["model_config"].mask_token_id == 4  # the tokenizer's <|mask|>
  assert np.isfinite(result["last_metrics"]["loss"])
  assert int(result["state"].step) == 1
  after = jax.device_get(result["state"].params)
  assert jax.tree.structure(after) == jax.tree.structure(params)

  # AdamW's first step, by hand: the bias-corrected moments are g and g^2, so the update is
  # lr * (g / (|g| + eps) + wd * w), decay on kernels and embeddings only. Clipping scales g
  # and keeps its sign: every weight moves by at most lr (plus decay), and those with a
  # gradient by exactly lr (embedding rows of tokens absent from the batch have none).
  def adam_direction(path, before, new):
    decayed = path[-1].key in ("kernel", "embedding")
    before = np.asarray(before, np.float64)
    return (before - np.asarray(new, np.float64)) / lr - wd * before * decayed

  directions = jax.tree_util.tree_leaves_with_path(
      jax.tree_util.tree_map_with_path(adam_direction, jax.device_get(params), after))
  assert len(directions) == len(jax.tree.leaves(params)) > 0
  for path, d in directions:
    name = jax.tree_util.keystr(path)
    moved, still = np.abs(np.abs(d) - 1) < 0.01, np.abs(d) < 0.01
    assert np.abs(d).max() <= 1.01, (name, np.abs(d).max())
    if name.endswith("['k_proj']['bias']"):
      continue  # its gradient is 0 up to rounding (softmax ignores a shift shared by all keys)
    assert np.mean(moved | still) > 0.9 and np.mean(moved) > 0.1, (name, np.mean(moved))
