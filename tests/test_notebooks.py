"""The Colab notebooks: stored clean (valid nbformat, one `parameters` cell, no outputs, the
same setup cell, "Open in Colab" links on dcjax.colab.REPO_URL) and each executes on CPU with
small parameters injected after its `parameters` cell, as papermill does.

`test_sampler_notebook` runs the kernel `python3` (this venv's ipykernel) on one host CPU
device, started in tmp_path with DCJAX_SOURCE set to this checkout, which this venv has installed:
the setup cell finds the pins satisfied and installs nothing. The Colab tests clone the repository
into a directory named `dcjax`, run the setup cell in a fresh venv (Python 3.13, Colab's, where
the machine has it, as CI does) with the working directory inside the clone, and then run every
notebook in a kernel of that venv started beside the clone, with no PYTHONPATH. A failing cell
fails the test with that cell's traceback; the executed notebook is kept at
tmp_path/executed.ipynb.
"""

import configparser
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from dcjax import colab
from dcjax.model import hf

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("sampler", "pretrain", "coupled_grpo")
CELL_TIMEOUT_S = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Colab's Python (its TPU VM runtime runs 3.13); CI machines have it at the pyenv path.
PY313_CANDIDATES = ("python3.13", "/root/.pyenv/versions/3.13.0/bin/python3.13")
INSTALL_TIMEOUT_S = 600


def _read(name):
  return nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)


def _parameter_cells(nb):
  return [i for i, cell in enumerate(nb.cells)
          if "parameters" in cell.get("metadata", {}).get("tags", [])]


def _kernel_env(pythonpath=True):
  env = dict(os.environ)
  # conftest.py forces 8 host devices for the test process; one device runs these faster.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["MPLBACKEND"] = "Agg"
  if pythonpath:
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                        if env.get("PYTHONPATH") else []))
  else:  # a fresh venv: nothing of this one's, as on Colab
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "JAX_COMPILATION_CACHE_DIR"):
      env.pop(key, None)
  return env


def run_notebook(name, tmp_path, *, kernel_name="python3", cwd=None, env=None, **overrides):
  """Executes notebooks/<name>.ipynb with `overrides` injected; returns (nb, summary dict).

  By default the kernel runs in tmp_path with this checkout as DCJAX_SOURCE.
  """
  nb = _read(name)
  (index,) = _parameter_cells(nb)
  defaults = dict(OUTPUT_DIR=str(tmp_path / "out"))
  if env is None:
    defaults["DCJAX_SOURCE"] = str(REPO)
  overrides = dict(defaults, **overrides)
  source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
  injected = nbformat.v4.new_code_cell(source)
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, injected)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
                          resources={"metadata": {"path": str(cwd or tmp_path)}})
  try:
    client.execute(env=_kernel_env() if env is None else env)
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
  assert colab.colab_url(f"{name}.ipynb") in nb.cells[0].source
  setup = nb.cells[params[0] + 1].source
  assert setup == _read("sampler").cells[_parameter_cells(_read("sampler"))[0] + 1].source
  assert f'REPO_URL = "{colab.REPO_URL}"' in setup and "git\", \"clone" in setup
  assert "pip\", \"install" in setup and "[tpu]" in setup and "os.kill(os.getpid(), 9)" in setup
  assert "find_spec" not in setup and "COLAB_TPU_ADDR" not in setup  # issue 19
  # Nothing imports jax before the setup cell has installed the pinned one.
  assert not any(re.search(r"^\s*(import|from) jax", cell.source, re.M)
                 for cell in nb.cells[:params[0] + 2] if cell.cell_type == "code")
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


SAMPLER_SMALL = dict(NUM_SAMPLES=2, MAX_NEW_TOKENS=16, STEPS=16, BLOCK_LENGTH=8)


def _check_sampler_summary(nb, summary):
  n, samples, block = (SAMPLER_SMALL[k] for k in ("MAX_NEW_TOKENS", "NUM_SAMPLES",
                                                   "BLOCK_LENGTH"))
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
  # The memory estimate counts exactly the parameters that were then loaded (fp32 here).
  memory = summary["memory"]
  assert memory["num_params"] == summary["num_params"] > 0
  assert memory["params_bytes"] == 4 * summary["num_params"]
  assert memory["params_bytes"] < memory["per_device_bytes"] < memory["device_bytes"]
  assert memory["fits"] is True
  assert "backend: cpu" in _stream_text(nb) and "memory estimate:" in _stream_text(nb)


@pytest.mark.slow
def test_sampler_notebook(tmp_path):
  nb, summary = run_notebook("sampler", tmp_path, **SAMPLER_SMALL)
  _check_sampler_summary(nb, summary)
  assert "installed now: False" in _stream_text(nb)  # this venv already has the pins


# ----------------------------------------------------------------------------- Colab


def _colab_links(text):
  return re.findall(r"https://colab\.research\.google\.com/github/[^\s)\"'\]]+", text)


def test_colab_links_and_clone_url_use_repo_url():
  """Every "Open in Colab" link (README, BUILD.md, notebooks) is dcjax.colab.colab_url of an
  existing notebook, every GitHub URL of the repository starts with REPO_URL, and the README
  links each notebook."""
  texts = {p.name: p.read_text() for p in [REPO / "README.md", REPO / "BUILD.md",
                                            *sorted(NOTEBOOKS.glob("*.ipynb"))]}
  links = {name: _colab_links(text) for name, text in texts.items()}
  for name, found in links.items():
    for link in found:
      notebook = link.rsplit("/", 1)[-1]
      assert (NOTEBOOKS / notebook).is_file(), (name, link)
      assert link == colab.colab_url(notebook), (name, link)
  assert {link.rsplit("/", 1)[-1] for link in links["README.md"]} == {
      f"{n}.ipynb" for n in NAMES}
  for name in NAMES:
    assert links[f"{name}.ipynb"] == [colab.colab_url(f"{name}.ipynb")]
  for name, text in texts.items():
    for url in re.findall(r"https://github\.com/[^\s)\"'\]]+", text):
      assert url.startswith(colab.REPO_URL), (name, url)


def _setup_cfg():
  cfg = configparser.ConfigParser(interpolation=None)
  cfg.read(REPO / "setup.cfg")
  return cfg


def _requirements(value):
  return [line.split("#")[0].strip() for line in value.splitlines() if line.split("#")[0].strip()]


def _pins(cfg):
  """{distribution: version} of install_requires' `==` pins."""
  return dict(re.match(r"([\w.-]+)(?:\[.*\])?==(\S+)$", r).groups()
              for r in _requirements(cfg["options"]["install_requires"]) if "==" in r)


def test_tpu_extra_is_jax_tpu_only():
  """`[tpu]` goes into Colab's system Python: jax's own TPU plugin at the pinned jax and
  nothing else (gcsfs pins an fsspec that fights Colab's; `[gcs]` has it)."""
  cfg = _setup_cfg()
  pins = _pins(cfg)
  extras = cfg["options.extras_require"]
  assert _requirements(extras["tpu"]) == [f"jax[tpu]=={pins['jax']}"]
  assert any(r.startswith("gcsfs==") for r in _requirements(extras["gcs"]))


def _dream_7b_config(tmp_path):
  """DiffuCoder-7B's config.json (the Qwen2.5-7B shapes) with no weights."""
  raw = dict(model_type="Dream", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
             max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
             tie_word_embeddings=False, mask_token_id=151666, pad_token_id=151643,
             bos_token_id=151643, eos_token_id=151643)
  (tmp_path / "config.json").write_text(json.dumps(raw))
  config, _ = hf.read_config(str(tmp_path))
  return config.__class__(**dict(config.to_dict(), param_dtype="bfloat16", dtype="bfloat16"))


def test_sampler_memory_check_on_a_v5e_chip(tmp_path):
  """A 7B checkpoint does not fit Colab's free v5e-1 chip; the report offers what does."""
  config = _dream_7b_config(tmp_path)
  assert colab.tpu_device_bytes("v5e-1") == colab.tpu_device_bytes("v5litepod-8") == 16 * 2**30
  assert colab.tpu_device_bytes("v6e-1") == 32 * 2**30 and colab.tpu_device_bytes("x") is None
  batch, length = 2, 80
  v5e = colab.sampler_memory(config, batch=batch, length=length, devices=[None],
                             device_bytes=colab.tpu_device_bytes("v5e-1"), device_source="v5e-1")
  # Qwen2.5-7B's published size: 7,615,616,512 parameters, 2 bytes each in bfloat16.
  assert v5e.num_params == 7_615_616_512 and v5e.params_bytes == 2 * 7_615_616_512
  # Per device, by hand: 4 fp32 [rows, L, V] logit-sized buffers, K and V of every layer,
  # one layer's hidden (4 D) and MLP (3 I) activations, the fp32 [H, L, L] xla scores.
  tokens = batch * length
  expected = (16 * tokens * 152064 + 2 * 28 * tokens * 4 * 128 * 2
              + 2 * tokens * (4 * 3584 + 3 * 18944) + 4 * batch * 28 * length**2)
  assert v5e.activation_bytes == expected
  assert v5e.per_device_bytes == v5e.params_bytes + expected and v5e.fits is False
  report = colab.fit_report(v5e, config, batch=batch, length=length)
  assert 'HF_DIR = ""' in report and "14.19 GiB" in report
  assert "v6e-1" in report and "v5e-8" in report  # 14.5 GiB of 32; 1.9 GiB of 16 per chip
  v5e8 = colab.sampler_memory(config, batch=batch, length=length, devices=[None] * 8,
                              device_bytes=16 * 2**30, device_source="v5e-8")
  assert v5e8.fits is True and v5e8.per_device_bytes == math.ceil(
      v5e8.params_bytes / 8) + colab.sampler_memory(
          config, batch=1, length=length, devices=[None], device_bytes=1).activation_bytes


def _python313():
  """A working Python 3.13 (pyenv's shim answers `which` even where it cannot run 3.13)."""
  for candidate in PY313_CANDIDATES:
    path = shutil.which(candidate)
    if path and subprocess.run([path, "-c", "import sys; assert sys.version_info[:2] == (3, 13)"],
                               capture_output=True).returncode == 0:
      return path
  if os.environ.get("CI") == "true":
    pytest.fail(f"Python 3.13 (Colab's) not found as any of {PY313_CANDIDATES}")
  return None


def _clone_working_tree(dest):
  """`git clone` of this repository with the working tree's uncommitted changes on top."""
  subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
  listed = subprocess.run(["git", "ls-files", "-z", "--modified", "--others",
                           "--exclude-standard"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.split("\0")
  for rel in filter(None, listed):
    source, target = REPO / rel, dest / rel
    if source.is_file():
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source, target)
    elif not source.exists():
      target.unlink(missing_ok=True)


def setup_cell_source(name="sampler"):
  """The notebook's parameters cell (defaults) and setup cell, as one program."""
  nb = _read(name)
  (index,) = _parameter_cells(nb)
  return nb.cells[index].source + "\n" + nb.cells[index + 1].source


def run_setup_cell(python, cwd, source):
  """Runs `source` as a kernel would: the working directory first on sys.path (`-c`)."""
  return subprocess.run([python, "-c", source], cwd=cwd, env=_kernel_env(pythonpath=False),
                        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)


def installed_report(python, cwd):
  """{distribution: version}, dcjax's install source and where `import dcjax` resolves, from a
  directory outside the checkout."""
  code = """if True:
    import importlib.metadata as m, json, dcjax, grain, jax, ml_collections
    urls = [json.loads(d.read_text("direct_url.json") or "{}").get("url")
            for d in m.distributions(name="dcjax")]
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections",
             "absl-py", "sentencepiece", "tokenizers", "safetensors", "tensorflow-datasets")
    print(json.dumps(dict(versions={n: m.version(n) for n in names}, urls=urls,
                          dcjax=dcjax.__file__, jax=jax.__version__)))
  """
  out = subprocess.run([python, "-c", code], cwd=cwd, env=_kernel_env(pythonpath=False),
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def colab_clone(tmp_path_factory):
  """(python, clone): a fresh venv (Python 3.13 where present, else this Python's base) and
  this repository cloned into <tmp>/dcjax, with nothing installed from it yet."""
  root = tmp_path_factory.mktemp("colab")
  base = _python313() or getattr(sys, "_base_executable", sys.executable)
  subprocess.run([base, "-m", "venv", str(root / "venv")], check=True)
  clone = root / "dcjax"
  _clone_working_tree(clone)
  return str(root / "venv" / "bin" / "python"), clone


@pytest.mark.slow
def test_setup_cell_installs_from_a_clone_named_dcjax(colab_clone, tmp_path):
  """Issue 19: with the working directory inside a checkout named `dcjax`, the source tree is
  importable as `dcjax`, yet nothing is installed; the setup cell must install the pins."""
  python, clone = colab_clone
  out = run_setup_cell(python, clone, setup_cell_source())
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  assert f"pip install -e {clone}:" in out.stdout and "installed now: True" in out.stdout
  report = installed_report(python, tmp_path)
  pins = _pins(_setup_cfg())
  assert report["versions"] == {n: pins[n] for n in report["versions"]}
  assert report["jax"] == pins["jax"]
  assert report["urls"] == [clone.as_uri()]  # an editable install of this clone
  assert pathlib.Path(report["dcjax"]).is_relative_to(clone)
  # Run again from a folder inside the checkout: found by walking up, nothing to install.
  again = run_setup_cell(python, clone / "notebooks", setup_cell_source("pretrain"))
  assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
  assert "installed now: False" in again.stdout and "pip install" not in again.stdout
  # A kernel that imported another jax first is told to restart, not left running it.
  stale = run_setup_cell(python, clone, "import sys, types\n"
                         "sys.modules['jax'] = types.SimpleNamespace(__version__='0.4.33')\n"
                         + setup_cell_source())
  assert stale.returncode != 0
  assert "jax 0.4.33 (imported) -> " + pins["jax"] in stale.stderr
  assert "Restart the kernel" in stale.stderr


@pytest.fixture(scope="module")
def colab_kernel(colab_clone):
  """(kernel name, kernel env, cwd, python): a kernel of the Colab venv, registered under the
  venv's prefix, after its setup cell has installed dcjax (runs after the install test)."""
  python, clone = colab_clone
  venv = pathlib.Path(python).parents[1]
  setup = run_setup_cell(python, clone, setup_cell_source())  # installs if run alone
  assert setup.returncode == 0, (setup.stdout + setup.stderr)[-4000:]
  subprocess.run([python, "-m", "pip", "install", "-q", "ipykernel==7.4.0"], check=True,
                 timeout=INSTALL_TIMEOUT_S, env=_kernel_env(pythonpath=False))
  subprocess.run([python, "-m", "ipykernel", "install", "--prefix", str(venv), "--name",
                  "dcjax-colab"], check=True, capture_output=True)
  return "dcjax-colab", str(venv / "share" / "jupyter"), clone, python


def run_in_colab_kernel(colab_kernel, monkeypatch, name, tmp_path, **overrides):
  """Colab's layout: the kernel starts beside <tmp>/dcjax (as /content beside /content/dcjax)
  in the venv the setup cell installed into, with no PYTHONPATH."""
  kernel, jupyter_path, clone, _ = colab_kernel
  monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
  nb, summary = run_notebook(name, tmp_path, kernel_name=kernel, cwd=clone.parent,
                             env=_kernel_env(pythonpath=False), **overrides)
  if _python313():
    assert nb.metadata["language_info"]["version"].startswith("3.13")
  text = _stream_text(nb)
  assert "installed now: False" in text and f"dcjax from {clone / 'dcjax'}" in text
  return nb, summary


@pytest.mark.slow
def test_sampler_notebook_in_a_python313_kernel(colab_kernel, tmp_path, monkeypatch):
  python = colab_kernel[3]
  version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, check=True).stdout.strip()
  if version != "(3, 13)":
    pytest.skip(f"the fresh venv runs Python {version}, not Colab's 3.13")
  nb, summary = run_in_colab_kernel(colab_kernel, monkeypatch, "sampler", tmp_path,
                                    **SAMPLER_SMALL)
  _check_sampler_summary(nb, summary)


# The other two notebooks run only in the Colab venv's kernel (Python 3.13 where the machine
# has it, as on CI), the sampler notebook in both.


@pytest.mark.slow
def test_pretrain_notebook(colab_kernel, tmp_path, monkeypatch):
  steps = 24
  nb, summary = run_in_colab_kernel(
      colab_kernel, monkeypatch, "pretrain", tmp_path, STEPS=steps, BATCH_SIZE=8, SEQ_LEN=64, LR=4e-3, WARMUP_STEPS=3,
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
def test_coupled_grpo_notebook(colab_kernel, tmp_path, monkeypatch):
  iterations = 3
  _, summary = run_in_colab_kernel(
      colab_kernel, monkeypatch, "coupled_grpo", tmp_path, SYNTHETIC_TASKS=12, HIDDEN_SIZE=32, WARM_START_STEPS=0,
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
