"""The Colab notebooks: stored clean (valid nbformat, one `parameters` cell, no outputs) and each
executes on CPU with small parameters injected after its `parameters` cell, as papermill does.

The kernel is `python3` (this venv's ipykernel) on one host CPU device, started in tmp_path
with the repository on PYTHONPATH, so the setup cell finds dcjax importable and installs
nothing. A failing cell fails the test with that cell's traceback; the executed notebook is
kept at tmp_path/executed.ipynb.
"""

import json
import math
import os
import pathlib
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("sampler", "pretrain", "coupled_grpo")
CELL_TIMEOUT_S = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _read(name):
  return nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)


def _parameter_cells(nb):
  return [i for i, cell in enumerate(nb.cells)
          if "parameters" in cell.get("metadata", {}).get("tags", [])]


def _kernel_env():
  env = dict(os.environ)
  # conftest.py forces 8 host devices for the test process; one device runs these faster.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                      if env.get("PYTHONPATH") else []))
  env["MPLBACKEND"] = "Agg"
  return env


def run_notebook(name, tmp_path, **overrides):
  """Executes notebooks/<name>.ipynb with `overrides` injected; returns (nb, summary dict)."""
  nb = _read(name)
  (index,) = _parameter_cells(nb)
  overrides = dict(OUTPUT_DIR=str(tmp_path / "out"), **overrides)
  source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
  injected = nbformat.v4.new_code_cell(source)
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, injected)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute(env=_kernel_env())
  except CellExecutionError as e:  # the failing cell's source and traceback, without colours
    pytest.fail(f"{name}.ipynb: a cell failed\n{ANSI.sub('', str(e))}", pytrace=False)
  finally:
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))
  with open(tmp_path / "out" / "summary.json") as f:
    return nb, json.load(f)


def _assert_png(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 1000, path


def _stream_text(nb):
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_clean(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata["kernelspec"]["name"] == "python3"
  assert nb.cells[0].cell_type == "markdown" and "Colab" in nb.cells[0].source
  params = _parameter_cells(nb)
  assert len(params) == 1, params
  source = nb.cells[params[0]].source
  for knob in ("DCJAX_SOURCE", "OUTPUT_DIR"):
    assert f"{knob} = " in source
  setup = nb.cells[params[0] + 1].source
  assert "pip" in setup and "[tpu]" in setup and "find_spec(\"dcjax\")" in setup
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_sampler_notebook(tmp_path):
  n, samples, block = 16, 2, 8
  nb, summary = run_notebook("sampler", tmp_path, NUM_SAMPLES=samples, MAX_NEW_TOKENS=n,
                             STEPS=n, BLOCK_LENGTH=block)
  assert summary["backend"] == "cpu" and len(summary["devices"]) == 1
  settings = summary["settings"]
  assert set(settings) == {"entropy", "maskgit_plus", "llada_blocks", "fast_dllm_threshold"}
  mask_id = summary["mask_id"]
  for name, s in settings.items():
    ids = np.asarray(s["completion_ids"])
    assert ids.shape == (samples, n), name
    assert s["masks_left"] == 0 and not (ids == mask_id).any(), name  # canvas fully decoded
    assert len(s["text_lengths"]) == samples
    assert 0.0 <= s["local_arness_1"] <= 1.0 and 0.0 <= s["global_arness_1"] <= 1.0
    html = pathlib.Path(s["html"]).read_text()
    assert html.count("class='tok'") == samples * n, name  # one cell per generated token
    _assert_png(s["png"])
  assert settings["entropy"]["num_steps"] == settings["llada_blocks"]["num_steps"] == n
  # Threshold decoding exits once the canvas is full: at least one step per block.
  assert n // block <= settings["fast_dllm_threshold"]["num_steps"] <= n
  for path in summary["plots"]:
    _assert_png(path)
  assert "backend: cpu" in _stream_text(nb)


@pytest.mark.slow
def test_pretrain_notebook(tmp_path):
  steps = 24
  nb, summary = run_notebook(
      "pretrain", tmp_path, STEPS=steps, BATCH_SIZE=8, SEQ_LEN=64, LR=4e-3, WARMUP_STEPS=3,
      LOG_EVERY=2, EVAL_EVERY=steps, EVAL_BATCHES=1, VOCAB_SIZE=512,
      TOKENIZER_TRAIN_CHARS=200_000, HIDDEN_SIZE=64, NUM_LAYERS=1, SAMPLE_NEW_TOKENS=8,
      SAMPLE_STEPS=8)
  assert summary["steps_done"] == steps and summary["stopped"] == "completed"
  assert summary["train_steps"] == list(range(2, steps + 1, 2))
  assert summary["eval_steps"] == [0, steps]
  assert all(math.isfinite(x) for x in summary["train_loss"] + summary["eval_loss"])
  # Held-out loss (fixed masks) and the batch CE both fall.
  assert summary["last_eval_loss"] < summary["first_eval_loss"] - 0.5, summary["eval_loss"]
  ce = summary["train_ce_masked"]
  assert np.mean(ce[-3:]) < np.mean(ce[:3]) - 0.3, ce
  _assert_png(summary["plots"][0])
  hf_dir = pathlib.Path(summary["hf_dir"])
  assert (hf_dir / "config.json").exists() and (hf_dir / "tokenizer.model").exists()
  assert "completion" in _stream_text(nb)


@pytest.mark.slow
def test_coupled_grpo_notebook(tmp_path):
  iterations = 3
  _, summary = run_notebook(
      "coupled_grpo", tmp_path, SYNTHETIC_TASKS=12, HIDDEN_SIZE=32, WARM_START_STEPS=0,
      RL_STEPS=iterations, NUM_PROMPTS=2, NUM_GENERATIONS=4, MAX_NEW_TOKENS=8,
      SAMPLER_STEPS=8, VARIANCE_SEQUENCES=4, VARIANCE_DRAWS=4)
  assert summary["iterations"] == iterations and summary["stopped"] == "completed"
  assert summary["steps"] == list(range(1, iterations + 1))
  assert len(summary["reward"]) == iterations
  assert all(math.isfinite(r) and r >= 0 for r in summary["reward"])
  assert set(summary["reward_components"]) == {"code", "format"}
  for values in summary["reward_components"].values():
    assert len(values) == iterations and all(math.isfinite(v) for v in values)
  var = summary["variance"]
  assert var["coupled"]["passes"] == var["decoupled"]["passes"] == 3
  assert var["full"]["passes"] == 1
  # Complementary masks lower the variance of the log-likelihood estimate (docs/grpo.md): the
  # same mask draws give the coupled estimator 3-10x less (seeds 0-2) than the decoupled one.
  assert 0 < var["coupled"]["var"] < var["decoupled"]["var"], var
  assert summary["variance_ratio_decoupled_over_coupled"] == pytest.approx(
      var["decoupled"]["var"] / var["coupled"]["var"])
  assert var["full"]["var"] < 1e-6 * max(var["coupled"]["var"], 1.0)  # deterministic
  assert all(math.isfinite(v["mean"]) and v["mean"] < 0 for v in var.values())
  _assert_png(summary["plots"][0])
