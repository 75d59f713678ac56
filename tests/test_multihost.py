"""Two JAX processes on this machine (CPU, gloo collectives) run `dcjax.main` as a 2-host pod.

What must hold on a pod, for pretraining and for coupled-GRPO: `jax.distributed.initialize` from the config, one global mesh over
both hosts' devices, a tokenizer trained once by process 0 and read by process 1, logs and
metrics from process 0 only, every host's data-iterator state in the checkpoint, and a rerun
resuming from it.
"""

import json
import os
import socket
import subprocess
import sys
import sysconfig


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS, DEVICES_PER_HOST = 2, 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _overrides(steps: int) -> list[str]:
  json_lib = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  fields = {
      "model.vocab_size": 512, "model.hidden_size": 32, "model.intermediate_size": 64,
      "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1,
      "model.head_dim": 16, "data.stdlib_root": json_lib, "data.eval_docs": 1,
      "data.seq_len": 32, "data.shuffle_window": 16, "data.tokenizer_vocab_size": 512,
      "data.tokenizer_train_chars": 200_000, "train.steps": steps, "train.batch_size": 8,
      "train.lr": 1e-2, "train.warmup_steps": 1, "train.log_every": 1,
      "train.eval_batches": 0, "train.sample_new_tokens": 0, "train.loss.truncate_prob": 0.0,
      "checkpoint.interval": 100, "checkpoint.keep": 2}
  return [f"--config.{k}={v}" for k, v in fields.items()]


def _launch(workdir, overrides: list[str], config: str = "configs/tiny.py") -> list[str]:
  """Runs both processes to the end; their combined stdout+stderr, process 0 first."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_HOST} "
                       "--xla_backend_optimization_level=0")
  procs = []
  for pid in range(HOSTS):
    cmd = [sys.executable, "-m", "dcjax.main", f"--config={ROOT}/{config}",
           f"--workdir={workdir}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           f"--config.distributed.num_processes={HOSTS}",
           f"--config.distributed.process_id={pid}", *overrides]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=420)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{out[-6000:]}"
  return outputs


def _logged_steps(workdir, key="train/loss") -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if key in line]


def test_two_process_pod_trains_checkpoints_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  out0, out1 = _launch(workdir, _overrides(steps=4))
  assert f"over {HOSTS * DEVICES_PER_HOST} cpu devices" in out0  # one global mesh
  assert "mesh " not in out1 and "step" not in out1.replace("steps", "")  # host 0 logs alone
  assert "tokenizer: trained sentencepiece" in out0
  assert "trained sentencepiece" not in out1  # process 1 read process 0's tokenizer
  assert _logged_steps(workdir) == [1, 2, 3, 4]  # one writer: no step twice
  data = os.listdir(os.path.join(workdir, "checkpoints", "4", "data"))
  assert {f"process_{i}-of-{HOSTS}.json" for i in range(HOSTS)} <= set(data)

  # The resumed run also samples at the end: one prompt on the 4-device batch axis.
  sample = ["--config.train.sample_new_tokens=8", "--config.train.sample_steps=8"]
  out0, out1 = _launch(workdir, _overrides(steps=6) + sample)
  assert "restored step 4" in out0
  assert "sample completion (dcjax.diffusion.sampler.generate" in out0
  assert "sample completion" not in out1
  assert _logged_steps(workdir) == [1, 2, 3, 4, 5, 6]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]


def test_two_process_pod_runs_coupled_grpo(tmp_path):
  """Rollouts, rewards per host, the learner on the global mesh; untrained, so rewards are 0."""
  workdir = str(tmp_path / "grpo")
  fields = {"rl.steps": 2, "warm_start.steps": 0, "rl.num_prompts": 2,
            "rl.num_generations": 2, "sampler.max_new_tokens": 8, "sampler.steps": 8,
            "prompts.synthetic_tasks": 16, "model.num_layers": 1}
  out0, out1 = _launch(workdir, [f"--config.{k}={v}" for k, v in fields.items()],
                       config="configs/grpo_tiny.py")
  assert f"over {HOSTS * DEVICES_PER_HOST} cpu devices" in out0
  assert "grpo completed: 2 iterations" in out0 and "grpo completed" not in out1
  assert _logged_steps(workdir, key="grpo/reward") == [1, 2]
  data = os.listdir(os.path.join(workdir, "checkpoints", "2", "data"))
  assert {f"process_{i}-of-{HOSTS}.json" for i in range(HOSTS)} <= set(data)
