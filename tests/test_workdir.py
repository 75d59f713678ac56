"""Workdirs: gs:// paths stay URLs, and a mirrored workdir survives a preemption onto a fresh VM.

The bucket is stood in for by a local directory with `mirrored=True`, so every copy goes
through the same `Workdir.pull/push` code a gs:// workdir uses (epath to GCS is not reachable
here).
"""

import json
import os

import pytest

from dcjax import workdir as workdir_lib
from dcjax.modes import train as loop
from tests.test_checkpoint import _config as checkpoint_config


def test_gs_paths_stay_urls(monkeypatch, tmp_path):
  monkeypatch.setenv("DCJAX_LOCAL_DIR", str(tmp_path / "mirror"))
  wd = workdir_lib.Workdir.create("gs://my-bucket/runs/a/")
  assert wd.root == "gs://my-bucket/runs/a/"
  assert wd.checkpoints == "gs://my-bucket/runs/a/checkpoints"
  assert wd.mirrored and wd.local == str(tmp_path / "mirror" / "my-bucket" / "runs" / "a")
  assert wd.path("metrics.jsonl") == os.path.join(wd.local, "metrics.jsonl")
  assert workdir_lib.join("gs://b", "x", "1") == "gs://b/x/1"
  assert workdir_lib.abspath("gs://b/x") == "gs://b/x"
  assert workdir_lib.abspath("file:///tmp/x") == "/tmp/x"
  # Checkpointer's directory: not turned into a local path ("<cwd>/gs:/b/...").
  assert workdir_lib.abspath(wd.checkpoints) == "gs://my-bucket/runs/a/checkpoints"


def test_local_workdir_is_its_own_mirror(tmp_path):
  wd = workdir_lib.Workdir.create(str(tmp_path / "run"))
  assert not wd.mirrored and wd.local == wd.root == str(tmp_path / "run")
  assert wd.checkpoints == str(tmp_path / "run" / "checkpoints")
  assert wd.pull() == [] and wd.push() == []
  assert os.path.isdir(wd.local)


def test_gs_without_gcsfs_names_the_fix(tmp_path):
  pytest.importorskip("etils")
  try:
    import gcsfs  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    pytest.skip("gcsfs is installed: the missing-library message cannot be provoked")
  except ImportError:
    pass
  wd = workdir_lib.Workdir.create("gs://dcjax-no-such-bucket/run", local=str(tmp_path / "m"))
  with pytest.raises(OSError, match="gcsfs"):
    wd.pull()


def test_pull_copies_only_what_the_mirror_lacks(tmp_path):
  bucket, vm = tmp_path / "bucket", tmp_path / "vm"
  (bucket / "tensorboard").mkdir(parents=True)
  (bucket / "checkpoints" / "3").mkdir(parents=True)
  (bucket / "metrics.jsonl").write_text("remote\n")
  (bucket / "tensorboard" / "events").write_text("ev")
  (bucket / "checkpoints" / "3" / "state").write_text("big")
  vm.mkdir()
  (vm / "metrics.jsonl").write_text("local, newer\n")
  wd = workdir_lib.Workdir(root=str(bucket), local=str(vm), mirrored=True)
  assert wd.pull() == [os.path.join("tensorboard", "events")]
  assert (vm / "metrics.jsonl").read_text() == "local, newer\n"
  assert not (vm / "checkpoints").exists()
  (vm / "checkpoints").mkdir()
  (vm / "checkpoints" / "junk").write_text("x")
  assert sorted(wd.push()) == ["metrics.jsonl", os.path.join("tensorboard", "events")]
  assert (bucket / "metrics.jsonl").read_text() == "local, newer\n"
  assert wd.push() == []  # nothing changed since
  with open(vm / "metrics.jsonl", "a") as f:
    f.write("one more\n")
  assert wd.push() == ["metrics.jsonl"]
  assert (bucket / "metrics.jsonl").read_text() == "local, newer\none more\n"
  assert not (bucket / "checkpoints" / "junk").exists()


def _config(steps):
  """test_checkpoint's small run (checkpoint interval 100: saves at a preemption and the end)."""
  c = checkpoint_config()
  c.train.steps = steps
  return c


def _steps(path):
  return [json.loads(line)["step"] for line in open(path) if "train/loss" in line]


@pytest.mark.slow
def test_preempted_run_resumes_on_a_fresh_vm(tmp_path):
  bucket = tmp_path / "bucket"
  first = workdir_lib.Workdir(root=str(bucket), local=str(tmp_path / "vm1"), mirrored=True)
  config = _config(steps=5)
  config.train.preempt_at_step = 3
  result = loop.train(config, first)
  assert result["stopped"] == "preempted" and result["steps_done"] == 3
  # Checkpoints went to the bucket, host files were pushed there, nothing but mirrors on "disk".
  assert os.listdir(bucket / "checkpoints") == ["3"]
  assert not (tmp_path / "vm1" / "checkpoints").exists()
  assert _steps(bucket / "metrics.jsonl") == [1, 2, 3]
  assert (bucket / "tokenizer" / "sp512.model").stat().st_size > 0
  assert any(f.startswith("events") for f in os.listdir(bucket / "tensorboard"))

  # The VM is gone; a new one with an empty disk resumes from the bucket.
  second = workdir_lib.Workdir(root=str(bucket), local=str(tmp_path / "vm2"), mirrored=True)
  pulled = second.pull()
  assert "metrics.jsonl" in pulled and os.path.join("tokenizer", "sp512.model") in pulled
  config.train.preempt_at_step = 0
  result = loop.train(config, second)
  assert result["stopped"] == "completed" and result["steps_done"] == 5
  assert _steps(bucket / "metrics.jsonl") == [1, 2, 3, 4, 5]
  assert sorted(os.listdir(bucket / "checkpoints")) == ["3", "5"]
