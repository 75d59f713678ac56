"""`mode="eval"` end to end: the sampler as generate_fn, sandbox, files, summary."""

import json

import jax
import numpy as np

from configs import eval_humaneval
from dcjax.eval import runner
from dcjax.eval.sampler_fn import make_generate_fn
from dcjax.parallel import mesh as mesh_lib


def _config(tmp_path):
  c = eval_humaneval.get_config()
  c.model.update(dict(vocab_size=264, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=1e4))
  c.sampler.update(dict(max_new_tokens=8, steps=8, temperature=1.0))
  c.eval.update(dict(limit=2, n_samples=2, k=(1, 2), batch_size=2, workers=2,
                     output_dir=str(tmp_path)))
  c.mesh.update(dict(data=2, fsdp=1, tensor=1))
  return c


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
  report = runner.run_eval(config, make_generate_fn(config, mesh), workdir=str(tmp_path),
                        progress=False)
  summary = json.loads(open(report.paths["summary"]).read())
  assert summary["sampler"]["steps"] == 8
  records = [json.loads(l) for l in open(report.paths["results"])]
  assert len(records) == 2
  # A random 1-layer model writes no working HumanEval solution.
  assert np.isclose(summary["pass@1"], 0.0)
