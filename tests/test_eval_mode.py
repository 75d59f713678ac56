"""`mode="eval"` end to end: the sampler as generate_fn, sandbox, files, summary.

A random model writes no working solution, so pass@1 = 0 would also be what a sandbox that
fails everything gives: the end-to-end run swaps some sampled completions for the canonical
solutions, and pass@k must come out at exactly the fraction that was made right."""

import json

import jax
import numpy as np
import pytest

from configs import eval_humaneval
from dcjax.eval import build_prompt, load_benchmark, runner
from dcjax.eval.sampler_fn import make_generate_fn
from dcjax.parallel import mesh as mesh_lib


def _config(tmp_path):
  c = eval_humaneval.get_config()
  c.model.update(dict(vocab_size=264, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=1e4))
  c.sampler.update(dict(max_new_tokens=8, steps=8, temperature=1.0))
  c.eval.update(dict(limit=4, n_samples=2, k=(1, 2), batch_size=2, workers=2,
                     output_dir=str(tmp_path)))
  c.mesh.update(dict(data=2, fsdp=1, tensor=1))
  return c


@pytest.mark.slow
def test_generate_fn_shapes_and_fresh_keys(tmp_path):
  config = _config(tmp_path)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:2])
  generate_fn = make_generate_fn(config, mesh)
  first = generate_fn(["def f(x):\n", "<|im_start|>user\nhi<|im_end|>\n"], 3)
  assert [len(s) for s in first] == [3, 3] and all(isinstance(t, str) for s in first for t in s)
  second = generate_fn(["def f(x):\n", "<|im_start|>user\nhi<|im_end|>\n"], 3)
  assert first != second  # each call samples with a new key


def test_eval_mode_writes_results(tmp_path):
  config = _config(tmp_path)
  # dcjax.main builds the mesh from all devices; use a 2-device one here.
  runner.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:2])
  sampler_fn = make_generate_fn(config, mesh)
  tasks = load_benchmark("humaneval")[:4]
  by_prompt = {build_prompt(t, config.eval.prompt_style): t for t in tasks}
  # Samples per task replaced by the canonical solution; the rest are the sampler's own.
  right = {tasks[0].task_id: 2, tasks[1].task_id: 1}
  sampled = {}

  def generate_fn(prompts, n):
    out = []
    for prompt, samples in zip(prompts, sampler_fn(prompts, n), strict=True):
      task = by_prompt[prompt]
      sampled[task.task_id] = samples
      k = right.get(task.task_id, 0)
      out.append([task.canonical_solution + "```"] * k + samples[k:])
    return out

  report = runner.run_eval(config, generate_fn, workdir=str(tmp_path), progress=False)
  summary = json.loads(open(report.paths["summary"]).read())
  assert summary["sampler"]["steps"] == 8
  records = [json.loads(l) for l in open(report.paths["results"])]
  assert [r["task_id"] for r in records] == [t.task_id for t in tasks]
  # A random 1-layer model writes no working HumanEval solution: only the swapped-in ones pass.
  assert [r["n_correct"] for r in records] == [2, 1, 0, 0]
  for r in records[2:]:
    assert r["completions"] == sampled[r["task_id"]] and len(r["completions"]) == 2
  # pass@1 = (1 + 1/2 + 0 + 0) / 4; pass@2 = (1 + 1 + 0 + 0) / 4.
  assert np.isclose(summary["pass@1"], 0.375) and np.isclose(summary["pass@2"], 0.5)
  assert report.pass_at_k == {"pass@1": 0.375, "pass@2": 0.5}
