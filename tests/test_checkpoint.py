"""Checkpoints: exact resume after SIGTERM (data order included), restore into another mesh,
clear errors for incompatible / corrupt checkpoints, and the non-finite-loss stop."""

import os
import pathlib
import shutil
import signal
import sysconfig

import jax
import pytest

from dcjax.config import model_config
from dcjax.parallel import mesh as mesh_lib
from dcjax import model as model_lib
from dcjax.train import checkpoint as ckpt_lib
from dcjax.modes import train as loop
from dcjax.train import optim, reporting
from dcjax.train import state as state_lib
from tests.tiny_train import tiny_train_config
from tests.trees import assert_trees_equal

STEPS = 6


def _config():
  c = tiny_train_config(STEPS)
  c.data.update(dict(stdlib_root=os.path.join(sysconfig.get_paths()["stdlib"], "json"),
                     eval_docs=1, seq_len=32, shuffle_window=16, tokenizer_vocab_size=512,
                     tokenizer_train_chars=200_000))
  c.checkpoint.update(dict(interval=100, keep=3))
  return c


def _train(config, workdir, sigterm_at=None):
  losses = {}

  def hook(step, metrics):
    losses[step] = metrics["loss"]
    if step == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)

  result = loop.train(config, str(workdir), hooks=[hook])
  return result, losses


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  result, losses = _train(_config(), workdir)
  return workdir, jax.device_get(result["state"].params), losses


@pytest.mark.slow
def test_resume_after_sigterm_is_bit_identical(straight, tmp_path):
  _, params, losses = straight
  # The signal lands while step 3's metrics are read, one step late: it stops after step 4.
  first, _ = _train(_config(), tmp_path, sigterm_at=STEPS // 2)
  stop = STEPS // 2 + 1
  assert first["stopped"] == "preempted" and first["steps_done"] == stop
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(stop)]
  second, second_losses = _train(_config(), tmp_path)
  assert second["stopped"] == "completed" and second["steps_done"] == STEPS
  # Same batches in the same order and the same masks: identical losses and parameters.
  for step in range(stop + 1, STEPS + 1):
    assert second_losses[step] == losses[step]
  assert_trees_equal(jax.device_get(second["state"].params), params)


def _abstract(config, mesh):
  mc = model_config(config)
  tx, _ = optim.make_optimizer(config.train, config.train.steps)
  import flax.linen as nn
  abstract = state_lib.abstract_state(nn.meta.unbox(model_lib.abstract_params(mc)), tx)
  shardings = state_lib.state_shardings(abstract, model_lib.param_shardings(mc, mesh), tx, mesh)
  return mc, state_lib.with_shardings(abstract, shardings)


@pytest.mark.slow
def test_restore_into_other_meshes(straight):
  workdir, params, _ = straight
  config = _config()
  for mesh in (mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}),
               mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])):
    mc, target = _abstract(config, mesh)
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), interval=1, keep=3)
    state = ckpt.restore(STEPS, target, None, ckpt_lib.make_meta(mc, config, target))
    ckpt.close()
    assert int(state.step) == STEPS
    leaf = state.params["layers"]["mlp"]["gate_proj"]["kernel"]
    assert leaf.sharding == target.params["layers"]["mlp"]["gate_proj"]["kernel"].sharding
    assert_trees_equal(jax.device_get(state.params), params)


@pytest.mark.slow
def test_incompatible_and_corrupt_checkpoints_say_which(straight, tmp_path):
  workdir, _, _ = straight
  config = _config()
  config.model.hidden_size = 64
  with pytest.raises(ckpt_lib.CheckpointError, match=r"incompatible.*config\.model\.hidden_size"):
    loop.train(config, str(workdir))

  broken = tmp_path / "broken"
  shutil.copytree(workdir / "checkpoints", broken / "checkpoints")
  state_dir = broken / "checkpoints" / str(STEPS) / "state"
  for path in pathlib.Path(state_dir).rglob("*"):
    if path.is_file() and "manifest" in path.name or path.parent.name == "d":
      path.write_bytes(b"garbage")
  # The only checkpoint is corrupt: nothing to fall back to, and nothing is moved or deleted.
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=rf"no checkpoint in .* can be restored: step\(s\) {STEPS} are corrupt"):
    loop.train(_config(), str(broken))
  assert sorted(os.listdir(broken / "checkpoints")) == [str(STEPS)]


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
  reporter = reporting.Reporter(
      str(tmp_path), total_steps=10, start_step=0, log_every=1, tokens_per_step=8,
      flops_per_step=1.0, peak_flops=1.0, latest_checkpoint=lambda: "step 4 in /ckpt")
  finite = dict(loss=1.0, ce_masked=1.0, accuracy=0.0, grad_norm=1.0, lr=1.0, nonfinite=False)
  reporter.step(5, finite, 0.0)
  with pytest.raises(reporting.NonFiniteLossError,
                     match=r"non-finite loss at step 6 .*latest checkpoint is step 4 in /ckpt"):
    reporter.step(6, dict(finite, loss=float("nan"), nonfinite=True), 0.0)
  reporter.close()
  assert reporter.last_metrics["loss"] == 1.0
