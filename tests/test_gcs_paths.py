"""gs:// where a path is taken: data globs and JSONL, hf_dir and tokenizers (copied to local
disk), and metric writes pushed to a mirrored workdir at each log interval.

GCS is not reachable here: `fake_gcs` routes every `etils.epath` path the code opens through
`dcjax.workdir.epath` from `gs://` to a local directory, so the URL handling (globbing, keeping
URLs, copying down) runs as it would against a bucket. The mirrored-workdir tests use
test_workdir.py's stand-in (a local root with mirrored=True).
"""

import gzip
import json
import os

import jax
import numpy as np
import pytest
from etils import epath

from dcjax import workdir as workdir_lib
from dcjax.data import sources
from dcjax.train import metrics as metrics_lib


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://X -> <tmp>/gcs/X for every path opened through dcjax.workdir's epath."""
  root = tmp_path / "gcs"
  root.mkdir()

  def fake(path):
    path = str(path)
    if path.startswith("gs://"):
      return epath.Path(str(root / path[len("gs://"):]))
    return epath.Path(path)

  monkeypatch.setattr(workdir_lib, "_epath", fake)
  monkeypatch.setenv("DCJAX_LOCAL_DIR", str(tmp_path / "local"))
  return root


def _jsonl(path, texts, gz=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
  path.write_bytes(gzip.compress(data) if gz else data)


def test_data_globs_and_jsonl_on_gs(fake_gcs):
  _jsonl(fake_gcs / "bucket" / "data" / "b.jsonl", ["b1", "b2"])
  _jsonl(fake_gcs / "bucket" / "data" / "a.jsonl.gz", ["a1"], gz=True)
  _jsonl(fake_gcs / "bucket" / "data" / "sub" / "c.jsonl", ["c1"])
  (fake_gcs / "bucket" / "data" / "notes.txt").write_text("x")
  assert sources.expand_paths("gs://bucket/data/*.jsonl*") == [
      "gs://bucket/data/a.jsonl.gz", "gs://bucket/data/b.jsonl"]
  assert sources.expand_paths("gs://bucket/data/*/*.jsonl") == ["gs://bucket/data/sub/c.jsonl"]
  with pytest.raises(ValueError, match=r"config\.data\.paths: .*'\*\*' is not supported"):
    sources.expand_paths("gs://bucket/data/**/*.jsonl")
  assert sources.expand_paths("gs://bucket/data/b.jsonl") == ["gs://bucket/data/b.jsonl"]
  with pytest.raises(FileNotFoundError, match=r"config\.data\.paths: 'gs://bucket/data/\*\.ar"):
    sources.expand_paths("gs://bucket/data/*.array_record")
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.expand_paths("gs://other-bucket/*.jsonl")
  src = sources.JsonlSource("gs://bucket/data/*.jsonl*")
  assert [src[i]["text"] for i in range(len(src))] == ["a1", "b1", "b2"]
  assert src.where(2) == "gs://bucket/data/b.jsonl:2"
  assert [r["text"] for _, r in sources.read_jsonl("gs://bucket/data/a.jsonl.gz")] == ["a1"]


def test_local_globs_unchanged(tmp_path):
  _jsonl(tmp_path / "x.jsonl", ["x"])
  assert sources.expand_paths(f"{tmp_path}/*.jsonl") == [str(tmp_path / "x.jsonl")]
  assert sources.expand_paths(f"file://{tmp_path}/*.jsonl") == [str(tmp_path / "x.jsonl")]


def test_hf_dir_and_tokenizer_on_gs_are_copied_down(fake_gcs, tmp_path):
  from dcjax import model as model_lib  # pylint: disable=import-outside-toplevel
  from dcjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from dcjax.model import hf  # pylint: disable=import-outside-toplevel
  from dcjax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=8, mask_token_id=3)
  params = model_lib.init_params(config, jax.random.key(0))
  hf.save_pretrained(config, params, str(fake_gcs / "bucket" / "ckpt"))
  texts = ["def f(x):\n  return x + 1\n" * 3, "import os\nprint(os.getcwd())\n"] * 20
  tokenizer_lib.train_sentencepiece(texts, 300, str(fake_gcs / "bucket" / "ckpt" / "sp.model"))

  loaded_config, loaded = hf.load_pretrained("gs://bucket/ckpt")
  local = tmp_path / "local" / "bucket" / "ckpt"
  assert (local / "model.safetensors").exists() and (local / "config.json").exists()
  assert loaded_config.hidden_size == 16
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert hf.read_config("gs://bucket/ckpt")[0].num_layers == 2

  mtime = os.stat(local / "model.safetensors").st_mtime_ns
  hf.load_pretrained("gs://bucket/ckpt")  # already there with the same size: not copied again
  assert os.stat(local / "model.safetensors").st_mtime_ns == mtime

  tok = tokenizer_lib.load_tokenizer("gs://bucket/ckpt/sp.model")
  assert tok.decode(tok.encode("def f(x):")) == "def f(x):"
  with pytest.raises(OSError):
    hf.load_pretrained("gs://bucket/missing")


def test_metric_writes_push_a_mirrored_workdir(tmp_path, monkeypatch):
  bucket = tmp_path / "bucket"
  wd = workdir_lib.Workdir(root=str(bucket), local=str(tmp_path / "vm"), mirrored=True)
  monkeypatch.setattr(workdir_lib, "PUSH_LOGS_EVERY_S", 3600.0)
  writer = metrics_lib.MetricWriter(wd.local, sync=wd.push_logs)
  writer.write(1, {"loss": 1.0})  # the first write pushes at once
  lines = (bucket / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1]
  assert any(f.startswith("events") for f in os.listdir(bucket / "tensorboard"))
  writer.write(2, {"loss": 0.5})  # within the interval: waits for the next push
  assert len((bucket / "metrics.jsonl").read_text().splitlines()) == 1
  monkeypatch.setattr(workdir_lib, "PUSH_LOGS_EVERY_S", 0.0)
  writer.write(3, {"loss": 0.25})
  lines = (bucket / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
  writer.close()
  local = workdir_lib.Workdir.create(str(tmp_path / "plain"))
  assert local.push_logs() == []  # a local workdir is written in place
