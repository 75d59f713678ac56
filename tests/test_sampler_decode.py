"""Prompt / completion helpers, the decoding-order pictures, and the sample mode end to end."""

import json
import os

import jax
import numpy as np
import pytest

from configs import sample as sample_config
from dcjax.config import ConfigError
from dcjax.diffusion import decode, visualize
from dcjax.modes import sample as sample_cli
from dcjax.model import loading, param_shardings


@pytest.fixture(scope="module")
def tok():
  return decode.ByteTokenizer()


def test_byte_tokenizer_round_trips_with_special_tokens(tok):
  text = "héllo<|im_end|>\n<|mask|>x"
  ids = tok.encode(text)
  assert ids.count(tok.chat_end_id) == 1 and ids.count(tok.mask_id) == 1
  assert ids[:6] == list("héllo".encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=True) == "héllo\nx"
  assert tok.vocab_size == 261 and tok.pad_id == tok.eos_id == 256


def test_chat_prompt_is_chatml(tok):
  prompt = decode.chat_prompt(tok, "hi", assistant_prefix="```python\n")
  assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n```python\n")


def test_cut_and_decode_completions(tok):
  stops = decode.stop_token_ids(tok)
  assert set(stops) == {tok.eos_id, tok.chat_end_id, tok.token_to_id("<|dlm_pad|>")}
  assert decode.cut_at_stop([5, 6, tok.chat_end_id, 7], stops) == [5, 6]
  assert decode.cut_at_stop([5, tok.chat_end_id, 7], stops, include_stop=True) == [
      5, tok.chat_end_id]
  dlm_pad = tok.token_to_id("<|dlm_pad|>")
  tokens = np.asarray([[1, 2] + tok.encode("ab") + [dlm_pad] + tok.encode("zz"),
                       [1, 2] + tok.encode("cde") + [tok.eos_id] * 2])
  assert decode.decode_completions(tok, tokens, 2) == ["ab", "cde"]


def test_encode_left_padded(tok):
  ids, keep = decode.encode_left_padded(tok, ["abc", "a"])
  np.testing.assert_array_equal(keep, [[1, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(ids[1], [tok.pad_id, tok.pad_id, ord("a")])
  ids, keep = decode.encode_left_padded(tok, ["abcdef"], length=2)  # keeps the end
  np.testing.assert_array_equal(ids, [[ord("e"), ord("f")]])


def test_decoding_order_html_and_png(tmp_path):
  steps = np.asarray([[2, 0, 1], [0, 2, 1]])
  page = visualize.decoding_order_html([["a", "<b>", "\n"], ["x", "y", "z"]], steps,
                                       prompts=["p1", "p2"], num_steps=3)
  assert page.count("class='tok'") == 6
  assert "&lt;b&gt;" in page and "<b>" not in page.split("</style>")[1]
  assert "title='position 0, step 2'" in page
  assert visualize.step_colour(0, 3) == "hsl(240, 75%, 80%)"
  assert visualize.step_colour(2, 3) == "hsl(0, 75%, 80%)"
  path = str(tmp_path / "order.png")
  visualize.decoding_order_png(steps, path)
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 100


@pytest.mark.parametrize("field,value,match", [
    ("sampler.alg", "greedy", "config.sampler.alg"),
    ("sampler.block_length", 5, "config.sampler.block_length"),
    ("sampler.cache", "full", "config.sampler.cache"),
    ("prompt", "", "config.prompt"),
    ("sampler.cfg_scale", -1.0, "config.sampler.cfg_scale"),
    ("infill.length", -2, "config.infill.length"),
])
def test_sample_config_validation_names_the_field(field, value, match):
  config = sample_config.get_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError, match=match):
    sample_cli.validate(config)


def _small_sample_config(monkeypatch):
  """configs/sample.py with a 1-layer model whose random params are put on the mesh directly
  (skips compiling flax's init, which is not under test here)."""
  from tests.test_sampler import random_params  # pylint: disable=import-outside-toplevel

  def host_init(model_config, rng, mesh):
    del rng
    return jax.device_put(random_params(model_config), param_shardings(model_config, mesh))

  monkeypatch.setattr(loading, "init_params", host_init)
  config = sample_config.get_config()
  config.model.update(dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=2, head_dim=16))
  return config


def test_sample_mode_end_to_end(tmp_path, capsys, monkeypatch):
  config = _small_sample_config(monkeypatch)
  config.num_samples = 3  # rounded up to the 8 batch shards of the default mesh, 3 printed
  config.prompt = "hi"
  config.visualize = True
  config.sampler.update(dict(max_new_tokens=8, steps=8, temperature=0.0))
  sample_cli.run(config, str(tmp_path))
  printed = capsys.readouterr().out
  assert printed.count("--- sample") == 3
  with open(tmp_path / "completions.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 3 and rows[0]["prompt"].endswith("<|im_start|>assistant\n")
  assert len(rows[0]["completion"].encode("utf-8", errors="surrogatepass")) <= 8 * 3
  page = (tmp_path / "decoding_order.html").read_text()
  assert page.count("class='tok'") == 3 * 8
  assert os.path.getsize(tmp_path / "decoding_order.png") > 1000


def test_sample_mode_infills_prefix_suffix(tmp_path, capsys, monkeypatch):
  config = _small_sample_config(monkeypatch)
  config.chat = False
  config.prompt = ""
  config.infill.update(dict(prefix="def f(", suffix="):\n", length=5))
  config.sampler.update(dict(max_new_tokens=8, steps=4, temperature=0.0, cfg_scale=0.5,
                             early_stop=True, logits_eos_inf=True, confidence_eos_eot_inf=True))
  sample_cli.run(config, str(tmp_path))
  printed = capsys.readouterr().out
  assert "4 steps" in printed  # early_stop never fires: nothing is appended after the suffix
  with open(tmp_path / "completions.jsonl") as f:
    row = json.loads(f.readline())
  assert row["prompt"] == "def f(" + "<|mask|>" * 5 + "):\n"
  filled = row["completion"]
  assert filled.startswith("def f(") and filled.endswith("):\n") and "<|mask|>" not in filled
  assert "<|endoftext|>" not in filled  # logits_eos_inf: the EOS token is never proposed
