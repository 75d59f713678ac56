"""Weights & Biases (offline, no network) beside TensorBoard and metrics.jsonl; GRPO's progress
bar, profile window and hparams; the install hint when wandb is missing."""

import builtins
import glob
import json
import os
import time

import jax
import pytest

from dcjax.train import metrics as metrics_lib

wandb = pytest.importorskip("wandb")  # in the test extra: CI always has it


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: config says offline too
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _wandb_records(workdir, expect=b"", timeout_s=30.0):
  """The run id and the bytes of every offline run file of it under <workdir>/wandb.

  wandb's service process may still be writing after `finish()` returns: waits (up to
  `timeout_s`) until the bytes hold `expect`."""
  with open(os.path.join(workdir, "wandb", "run_id")) as f:
    run_id = f.read().strip()
  deadline = time.monotonic() + timeout_s
  while True:
    files = glob.glob(os.path.join(workdir, "wandb", "wandb", f"offline-run-*-{run_id}",
                                   f"run-{run_id}.wandb"))
    data = b"".join(open(f, "rb").read() for f in files)
    if (files and expect in data) or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  assert files, os.listdir(os.path.join(workdir, "wandb"))
  return run_id, files, data


def test_writer_logs_offline_and_resumes_the_run(tmp_path):
  import ml_collections  # pylint: disable=import-outside-toplevel
  section = ml_collections.ConfigDict(dict(project="dcjax-unit", entity="", mode="offline",
                                           name=""))
  writer = metrics_lib.MetricWriter(str(tmp_path), wandb=section, hparams={"train": {"lr": 0.5}})
  writer.write(1, {"loss": 2.0, "grad_norm": 1.0})
  writer.close()
  run_id, files, data = _wandb_records(str(tmp_path), expect=b"train/grad_norm")
  assert b"train/loss" in data and b"train/grad_norm" in data and b"dcjax-unit" in data
  writer = metrics_lib.MetricWriter(str(tmp_path), start_step=1, wandb=section)
  writer.write(2, {"loss": 1.0})
  writer.close()
  assert _wandb_records(str(tmp_path))[0] == run_id  # a resume continues the same run id


@pytest.mark.slow
def test_train_logs_to_wandb_offline(tmp_path):
  from tests.test_checkpoint import _config as small  # pylint: disable=import-outside-toplevel
  from dcjax.modes import train as loop  # pylint: disable=import-outside-toplevel
  c = small()
  c.train.steps = 2
  c.wandb.update(dict(project="dcjax-test", mode="offline", name="tiny"))
  loop.train(c, str(tmp_path))
  run_id, files, data = _wandb_records(str(tmp_path), expect=b"train/grad_norm")
  assert b"train/loss" in data and b"train/grad_norm" in data and b"dcjax-test" in data
  assert b"train.lr" in data or b"lr" in data  # the config went along
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f if "train/loss" in line] == [1, 2]

  # A resume continues the same wandb run id (a second offline file, synced into one run).
  c.train.steps = 3
  loop.train(c, str(tmp_path))
  run_id2, files2, data2 = _wandb_records(str(tmp_path), expect=b"train/loss")
  assert run_id2 == run_id and len(files2) == len(files) + 1 and b"train/loss" in data2


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
  real_import = builtins.__import__

  def no_wandb(name, *args, **kwargs):
    if name == "wandb":
      raise ImportError("No module named 'wandb'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_wandb)
  import ml_collections  # pylint: disable=import-outside-toplevel
  section = ml_collections.ConfigDict(dict(project="p", entity="", mode="offline", name=""))
  with pytest.raises(ImportError, match=r"pip install -e '\.\[wandb\]'"):
    metrics_lib.MetricWriter(str(tmp_path), wandb=section)
  section.project = ""
  metrics_lib.MetricWriter(str(tmp_path), wandb=section).close()  # no project: wandb unused


@pytest.mark.slow
def test_grpo_wandb_profile_hparams_and_bar(tmp_path, capsys):
  from dcjax.modes import grpo as loop  # pylint: disable=import-outside-toplevel
  from dcjax.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel
  from tests.test_grpo_loop import reward_fn, tiny  # pylint: disable=import-outside-toplevel
  c = tiny(workdir_steps=2)
  c.checkpoint.interval = 100
  c.wandb.update(dict(project="dcjax-grpo", mode="offline"))
  c.profile_steps = "1,2"
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  result = loop.train_grpo(c, str(tmp_path), reward_fn=reward_fn, mesh=mesh)
  assert len(result["history"]) == 2
  _, _, data = _wandb_records(str(tmp_path), expect=b"grpo/kl")
  assert b"grpo/reward" in data and b"grpo/kl" in data
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces
  events = b"".join(open(f, "rb").read() for f in
                    glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")))
  assert b"_hparams_/session_start_info" in events and b"rl.num_generations" in events
  out = capsys.readouterr()
  # The log lines reach stdout whole; under pytest stderr is not a terminal: no bar redraws.
  assert "iter    1 | reward" in out.out and "iter    2 | reward" in out.out
  assert "\r" not in out.err
