"""mode=compile: TPU slices by gcloud name, and the configs' real programs compiled for a TPU
slice on this CPU host by libtpu (docs/compile.md)."""

import json
import os
import subprocess
import sys

import pytest

from dcjax.parallel import topology
from tests.conftest import REPO


def _require_libtpu():
  """Skips without libtpu, except under CI=true (where the test extra installs it)."""
  try:
    topology.devices(topology.parse("v5p-8"))
  except RuntimeError as e:
    if os.environ.get("CI", "").lower() == "true":
      raise
    pytest.skip(f"libtpu unavailable: {e}")


@pytest.mark.parametrize("name,generation,chips,shape", [
    ("v5p-8", "v5p", 4, (2, 2, 1)), ("v5p-64", "v5p", 32, (2, 4, 4)),
    ("v5p-128", "v5p", 64, (4, 4, 4)), ("v4-32", "v4", 16, (2, 2, 4)),
    ("v5litepod-1", "v5e", 1, (1, 1)), ("v5litepod-16", "v5e", 16, (4, 4)),
    ("v6e-8", "v6e", 8, (2, 4)), ("v6e-256", "v6e", 256, (16, 16))])
def test_slice_names_follow_gcloud(name, generation, chips, shape):
  s = topology.parse(name)
  assert (s.generation, s.chips, s.shape) == (generation, chips, shape)
  assert s.topology_name == f"{generation}:{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("name,message", [
    ("v3-8", "not one of v4-N"), ("v5p-7", "multiple of 2"), ("v5litepod-12", "power of two"),
    ("tpu", "not one of")])
def test_bad_slice_names_are_refused(name, message):
  with pytest.raises(ValueError, match=message):
    topology.parse(name)


def test_described_devices_match_the_slice():
  _require_libtpu()
  for name, kind in (("v5p-64", "TPU v5"), ("v4-32", "TPU v4"), ("v5litepod-8", "TPU v5 lite")):
    devices = topology.devices(topology.parse(name))
    assert len(devices) == topology.parse(name).chips and devices[0].device_kind == kind
  assert len(topology.devices(topology.parse("v5p-8"), num_slices=2)) == 8


def _compile(config, *flags):
  cmd = [sys.executable, "-m", "dcjax.main", f"--config={config}", "--config.mode=compile",
         *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _report(proc):
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiny_train_step_compiles_for_v5p_and_a_tight_budget_fails():
  _require_libtpu()
  ok = _compile("configs/tiny.py", "--config.compile_topology=v5p-8",
                "--config.mesh.data=2", "--config.mesh.fsdp=2")
  assert ok.returncode == 0, ok.stderr[-3000:]
  report = _report(ok)
  assert (report["topology"], report["chips"], report["hbm_gib_per_chip"]) == ("v5p-8", 4, 95.0)
  step = report["programs"]["train_step"]
  assert step["fits"] and 0 < step["peak_gib_per_chip"] < 1 and step["xla_flops_per_chip"] > 0
  assert "train_step: peak" in ok.stdout and "mesh {'data': 2, 'fsdp': 2" in ok.stdout

  tight = _compile("configs/tiny.py", "--config.compile_topology=v5p-8",
                   "--config.compile_hbm_fraction=1e-6")
  assert tight.returncode == 1
  assert not _report(tight)["programs"]["train_step"]["fits"]
  assert "error: train_step does not fit v5p-8" in tight.stderr


def test_missing_topology_is_a_clear_error():
  proc = _compile("configs/tiny.py")
  assert proc.returncode != 0 and "config.compile_topology is empty" in proc.stderr
  proc = _compile("configs/tiny.py", "--config.compile_topology=v5p-63")
  assert proc.returncode != 0 and "config.compile_topology" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config,flags,programs", [
    ("configs/diffucoder_7b_adapt.py", [], ["train_step"]),
    # The config's docstring: on 32 chips, 16 prompts so the 160 rollouts split evenly.
    ("configs/grpo_diffucoder_7b.py", ["--config.rl.num_prompts=16"],
     ["rollout_sampler", "score", "policy_update"]),
])
def test_7b_configs_fit_a_v5p_64(config, flags, programs):
  """The shipped 7B stages compile for a v5p-64 within 90% of HBM, the adaptation at its
  paper length of 4096 tokens (BUILD.md, "Memory per chip")."""
  _require_libtpu()
  proc = _compile(config, "--config.compile_topology=v5p-64", *flags)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = _report(proc)
  assert sorted(report["programs"]) == sorted(programs)
  for name, entry in report["programs"].items():
    assert entry["fits"] and entry["peak_gib_per_chip"] <= 0.9 * 95.0, (name, entry)
