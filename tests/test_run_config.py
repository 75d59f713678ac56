"""<workdir>/config.json: saved, checked on a resume (allow-list, allow_config_change, backups),
through a mirrored workdir; config.profile_steps validated and traced; TensorBoard hparams."""

import glob
import json
import os
import types

import pytest

from dcjax import config as config_lib
from dcjax import run_config
from dcjax import workdir as workdir_lib
from tests.tiny_train import tiny_train_config


def _config(**train):
  c = tiny_train_config(3)
  c.mode = "train"
  c.train.update(train)
  return c


def _fake_checkpoint(root):
  os.makedirs(os.path.join(root, "checkpoints", "3"), exist_ok=True)


def _saved(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.parametrize("spec", ["10", "10,15,20", "a,b", "15,10", "5,5", "-1,3", "1.5,3"])
def test_bad_profile_steps_name_the_field(spec):
  c = _config()
  c.profile_steps = spec
  with pytest.raises(config_lib.ConfigError, match=r"config\.profile_steps"):
    config_lib.validate(c)


def test_profile_window_and_wandb_mode():
  c = _config()
  assert config_lib.profile_window(c) is None
  c.profile_steps = " 10, 15"
  assert config_lib.profile_window(c) == (10, 15)
  c.wandb.mode = "cloud"
  with pytest.raises(config_lib.ConfigError, match=r"config\.wandb\.mode"):
    config_lib.validate(c)


def test_resume_with_a_changed_config_stops(tmp_path):
  wd = workdir_lib.Workdir.create(str(tmp_path / "run"))
  assert run_config.record(_config(), wd) == "config.json"
  assert _saved(wd.path("config.json"))["train"]["lr"] == 0.01
  _fake_checkpoint(wd.root)

  # Fields on the allow-list change freely on a resume.
  allowed = _config(preempt_at_step=2, log_every=5)
  allowed.profile_steps = "1,2"
  allowed.wandb.project = "p"
  allowed.compile_topology = "v5p-8"
  run_config.record(allowed, wd)
  assert glob.glob(wd.path("config.*.json")) == []
  assert _saved(wd.path("config.json"))["profile_steps"] == "1,2"

  changed = _config(lr=0.02, steps=5)
  with pytest.raises(run_config.ConfigChangedError) as e:
    run_config.record(changed, wd)
  message = str(e.value)
  assert "train.lr: 0.01 -> 0.02" in message and "train.steps: 3 -> 5" in message
  assert "allow_config_change=True" in message and "profile_steps" not in message
  assert _saved(wd.path("config.json"))["train"]["lr"] == 0.01  # untouched

  changed.allow_config_change = True
  run_config.record(changed, wd)
  assert _saved(wd.path("config.json"))["train"]["lr"] == 0.02
  kept = glob.glob(wd.path("config.*.json"))
  assert len(kept) == 1 and _saved(kept[0])["train"]["lr"] == 0.01


def test_no_checkpoint_or_no_restore_is_not_a_resume(tmp_path):
  wd = workdir_lib.Workdir.create(str(tmp_path / "run"))
  run_config.record(_config(), wd)
  run_config.record(_config(lr=0.5), wd)  # no checkpoint yet: starts over, old config kept
  assert _saved(wd.path("config.json"))["train"]["lr"] == 0.5
  assert len(glob.glob(wd.path("config.*.json"))) == 1
  _fake_checkpoint(wd.root)
  fresh = _config(lr=0.7)
  fresh.checkpoint.restore = False
  run_config.record(fresh, wd)
  assert _saved(wd.path("config.json"))["train"]["lr"] == 0.7


def test_other_modes_write_their_own_file(tmp_path):
  wd = workdir_lib.Workdir.create(str(tmp_path / "run"))
  run_config.record(_config(), wd)
  _fake_checkpoint(wd.root)
  sample = _config(lr=0.3)
  sample.mode = "sample"
  assert run_config.record(sample, wd) == "config.sample.json"
  assert _saved(wd.path("config.sample.json"))["mode"] == "sample"
  assert _saved(wd.path("config.json"))["mode"] == "train"


def test_mirrored_workdir_publishes_and_checks_the_bucket(tmp_path):
  bucket = tmp_path / "bucket"
  first = workdir_lib.Workdir(root=str(bucket), local=str(tmp_path / "vm1"), mirrored=True)
  run_config.record(_config(), first)
  assert _saved(bucket / "config.json")["train"]["lr"] == 0.01  # at once, not at a push
  _fake_checkpoint(bucket)
  second = workdir_lib.Workdir(root=str(bucket), local=str(tmp_path / "vm2"), mirrored=True)
  with pytest.raises(run_config.ConfigChangedError, match="train.lr"):
    run_config.record(_config(lr=0.2), second)  # a fresh VM: the bucket's config.json counts


def test_main_records_and_refuses(tmp_path, monkeypatch):
  """main.py: config.json after validation, before the mode runs; a changed resume exits."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from dcjax import main as main_lib  # pylint: disable=import-outside-toplevel
  ran = []
  monkeypatch.setattr(config_lib, "resolve_mode",
                      lambda mode: (lambda config, wd: ran.append(wd.root), None))
  workdir = str(tmp_path / "run")
  monkeypatch.setattr(main_lib, "_WORKDIR", types.SimpleNamespace(value=workdir))
  monkeypatch.setattr(main_lib, "_CONFIG", types.SimpleNamespace(value=tiny.get_config()))
  main_lib.main([])
  assert ran == [workdir] and _saved(os.path.join(workdir, "config.json"))["mode"] == "train"
  _fake_checkpoint(workdir)
  changed = tiny.get_config()
  changed.train.lr = 0.123
  monkeypatch.setattr(main_lib, "_CONFIG", types.SimpleNamespace(value=changed))
  with pytest.raises(SystemExit, match=r"train\.lr: .* -> 0\.123"):
    main_lib.main([])
  assert ran == [workdir]  # the mode never ran


def _event_bytes(workdir):
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert files
  return b"".join(open(f, "rb").read() for f in files)


def test_profiler_traces_only_its_window(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from dcjax.train import profiling  # pylint: disable=import-outside-toplevel
  c = _config()
  c.profile_steps = "2,4"
  lines = []
  profiler = profiling.Profiler(c, str(tmp_path / "profile"), log=lines.append)
  f = jax.jit(lambda x: x * 2)
  x = jax.numpy.ones(4)
  for step in range(6):
    profiler.before(step, wait_for=x)
    assert profiler.active == (2 <= step < 4), step
    x = f(x)
  profiler.stop()
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert len(lines) == 2 and "[2, 4)" in lines[0]
  off = profiling.Profiler(_config(), str(tmp_path / "none"))
  off.before(0)
  assert not off.active and not os.path.exists(tmp_path / "none")


@pytest.mark.slow
def test_train_profiles_its_window_and_writes_hparams(tmp_path):
  from tests.test_checkpoint import _config as small  # pylint: disable=import-outside-toplevel
  from dcjax.modes import train as loop  # pylint: disable=import-outside-toplevel
  c = small()
  c.train.steps = 3
  c.profile_steps = "1,2"
  messages = []
  result = loop.train(c, str(tmp_path), hooks=[lambda step, m: messages.append(step)])
  assert result["stopped"] == "completed" and messages == [1, 2, 3]
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces and all(os.path.getsize(t) > 0 for t in traces)
  events = _event_bytes(str(tmp_path))
  assert b"_hparams_/session_start_info" in events and b"train.lr" in events
  assert b"profile_steps" in events
