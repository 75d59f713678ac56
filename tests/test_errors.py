"""Bad input stops with one line that names the culprit: the file and line of a bad record, a
corpus with no text, a sequence longer than the model's positions (issue 17, section 4)."""

import json
import os
import re
import sysconfig

import jax
import ml_collections
import numpy as np
import pytest

from configs import grpo_tiny, tiny
from dcjax import config as config_lib
from dcjax.data import sources
from dcjax.diffusion.sampler import generate
from dcjax.eval import tasks as eval_tasks
from dcjax.model import ModelConfig
from dcjax.rl import prompts as rl_prompts
from dcjax.modes import train as loop
from dcjax.config import ConfigError

JSON_DIR = os.path.join(sysconfig.get_paths()["stdlib"], "json")


def _write_lines(path, lines):
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return str(path)


def _data_config(**overrides):
  d = ml_collections.ConfigDict(dict(
      kind="pretrain", source="jsonl", paths="", text_field="text", messages_field="messages",
      prompt_field="prompt", response_field="response"))
  d.update(overrides)
  return d


# ----------------------------------------------------------------------------- file and line


def test_non_utf8_line_names_file_and_line(tmp_path):
  path = _write_lines(tmp_path / "a.jsonl", [b'{"text": "ok"}', b"", b'{"text": "caf\xe9"}'])
  source = sources.JsonlSource(path)
  assert source[0] == {"text": "ok"}
  with pytest.raises(sources.DataError, match=rf"^{path}:3: not valid UTF-8"):
    source[1]


def test_record_without_its_text_field_names_file_line_and_field(tmp_path):
  path = _write_lines(tmp_path / "a.jsonl", [b'{"text": "ok"}', b'{"body": "x"}'])
  source = sources.make_source(_data_config(paths=path))
  with pytest.raises(sources.DataError,
                     match=rf"^{path}:2: record has no field 'text' \(config.data.text_field\); "
                           r"keys: \['body'\]"):
    source[1]
  sft_source = sources.make_source(_data_config(kind="sft", paths=path))
  with pytest.raises(sources.DataError, match=rf"^{path}:1: SFT record has neither 'messages'"):
    sft_source[0]


def test_malformed_chat_turn_names_file_and_line(tmp_path):
  turns = [{"role": "user", "content": "hi"}, {"role": "assistant"}]  # no content
  path = _write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": turns}).encode()])
  with pytest.raises(sources.DataError, match=rf"^{path}:1: 'messages' turn 1 needs a 'role'"):
    sources.make_source(_data_config(kind="sft", paths=path))[0]


def test_array_record_names_the_file_and_record(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  paths = []
  for name, records in (("a", [{"text": "x"}]), ("b", [{"text": "y"}, {"other": 1}])):
    paths.append(str(tmp_path / f"{name}.array_record"))
    writer = ArrayRecordWriter(paths[-1], "group_size:1")
    for record in records:
      writer.write(json.dumps(record).encode())
    writer.close()
  source = sources.make_source(_data_config(source="array_record", paths=",".join(paths)))
  assert source[1] == {"text": "y"}
  with pytest.raises(sources.DataError, match=rf"^{paths[1]} record 1: record has no field"):
    source[2]


def test_rl_prompt_files_name_the_line(tmp_path):
  good = b'{"question": "q", "test_cases": ["assert f() == 1"]}'
  path = _write_lines(tmp_path / "p.jsonl", [good, b"", b'{"question": "q"}'])
  with pytest.raises(sources.DataError, match=rf"^{path}:3: record lacks 'question'"):
    rl_prompts.load_jsonl_tasks(path)
  path = _write_lines(tmp_path / "q.jsonl", [good, b'{"question": "\xff"}'])
  with pytest.raises(sources.DataError, match=rf"^{path}:2: not valid UTF-8"):
    rl_prompts.load_jsonl_tasks(path)
  path = _write_lines(tmp_path / "m.jsonl", [b'{"text": "t", "test_list": []}'])
  with pytest.raises(sources.DataError, match=rf"^{path}:1: MBPP record lacks \['task_id'\]"):
    rl_prompts.load_mbpp_tasks(path)


def test_benchmark_files_name_the_line(tmp_path):
  path = _write_lines(tmp_path / "mbpp.jsonl", [b'{"task_id": 11, "text": "\xfe"}'])
  with pytest.raises(sources.DataError, match=rf"^{path}:1: not valid UTF-8"):
    eval_tasks.load_mbpp(path)
  path = _write_lines(tmp_path / "plus.jsonl", [b"", b'{"task_id": "HumanEval/0"}'])
  with pytest.raises(sources.DataError, match=rf"^{path}:2: record 'HumanEval/0' lacks field"):
    eval_tasks.load_evalplus(path)


# ----------------------------------------------------------------------------- no text


def test_corpus_of_empty_texts_is_refused(tmp_path):
  path = _write_lines(tmp_path / "empty.jsonl", [b'{"text": ""}', b'{"text": "  \\n"}'] * 50)
  d = _data_config(paths=path)
  docs = sources.make_source(d)
  with pytest.raises(sources.DataError, match=r"none of the 100 training records checked "
                                              r"\(of 100\) has any text in field 'text'"):
    sources.require_text(docs, d, "training", docs)
  chats = [json.dumps({"prompt": "p", "response": ""}).encode()] * 3
  d = _data_config(kind="sft", paths=_write_lines(tmp_path / "chat.jsonl", chats))
  with pytest.raises(sources.DataError, match="held-out records checked .* the response"):
    sources.require_text(sources.make_source(d), d, "held-out")
  mixed = [b'{"text": ""}'] * 999 + [b'{"text": "x"}']  # the last record is always looked at
  d = _data_config(paths=_write_lines(tmp_path / "mixed.jsonl", mixed))
  sources.require_text(sources.make_source(d), d, "training")


def test_training_on_empty_texts_stops_with_one_line(tmp_path):
  path = _write_lines(tmp_path / "empty.jsonl", [b'{"text": ""}'] * 80)
  config = tiny.get_config()
  config.data.update(dict(source="jsonl", paths=path, tokenizer=str(tmp_path / "absent.model")))
  with pytest.raises(SystemExit) as exit_info:
    loop.run(config, str(tmp_path / "run"))  # stops before the tokenizer is read
  message = str(exit_info.value.code)
  assert message.startswith(f"error: JsonlSource({path!r}: 1 files, 80 records): none of the")
  assert "\n" not in message


def test_eval_batches_without_held_out_records_is_refused():
  config = tiny.get_config()
  config.data.eval_docs = 0
  with pytest.raises(ConfigError, match=r"config.train.eval_batches=\d+ but "
                                             r"config.data.eval_docs=0"):
    config_lib.validate(config)


# ----------------------------------------------------------------------------- positions


def _too_long(seq_len: int, positions: int, source: str) -> str:
  """The message (a regex) for a seq_len beyond the model's positions, read from `source`."""
  return re.escape(f"config.data.seq_len = {seq_len} positions, more than the model's "
                   f"max_position_embeddings={positions} ({source})")


def test_seq_len_beyond_positions_fails_validation():
  config = tiny.get_config()
  config.data.seq_len = 2048
  with pytest.raises(ConfigError, match=_too_long(2048, 1024, "config.model")):
    config_lib.validate(config)
  config.model.max_position_embeddings = 0
  with pytest.raises(config_lib.ConfigError, match="max_position_embeddings=0 must be"):
    config_lib.validate(config)


@pytest.mark.slow
def test_seq_len_beyond_a_checkpoints_positions_names_its_config_json(tmp_path):
  from dcjax.data import tokenizer as tokenizer_lib
  from dcjax.model import hf
  from dcjax import model as model_lib

  tok_path = str(tmp_path / "sp.model")
  texts = [sources.StdlibSource(JSON_DIR)[i]["text"] for i in range(4)]
  tokenizer_lib.train_sentencepiece(texts, 512, tok_path)
  model = ModelConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
  hf.save_pretrained(model, model_lib.init_params(model, jax.random.key(0)), str(tmp_path / "hf"))
  config = tiny.get_config()
  config.hf_dir = str(tmp_path / "hf")
  config.train.update(dict(eval_batches=0, sample_new_tokens=0))
  config.data.update(dict(stdlib_root=JSON_DIR, eval_docs=1, seq_len=128, tokenizer=tok_path))
  config_lib.validate(config)  # the checkpoint's positions are not known yet
  with pytest.raises(ConfigError, match=_too_long(128, 64, f"{tmp_path}/hf/config.json")):
    loop.train(config, str(tmp_path / "run"))


def test_prompt_beyond_positions_is_refused_before_sampling():
  config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024,
                       mask_token_id=95)
  ids = np.ones((1, 2216), np.int32)
  with pytest.raises(ValueError, match=r"a 2216-token prompt \+ max_new_tokens=64 = 2280 "
                                       r"positions, more than the model's "
                                       r"max_position_embeddings=1024"):
    generate(config, None, ids, max_new_tokens=64, steps=64, alg="entropy")
  with pytest.raises(ValueError, match="= 1025 positions"):
    generate(config, None, ids[:, :961], max_new_tokens=64, steps=64, alg="entropy")


def test_grpo_canvas_beyond_positions_fails_validation():
  config = grpo_tiny.get_config()
  config.prompts.max_prompt_len = 500
  with pytest.raises(ValueError, match=r"config.prompts.max_prompt_len=500 \+ "
                                       r"config.sampler.max_new_tokens=32 = 532 positions, "
                                       r"more than the model's max_position_embeddings=512"):
    config_lib.validate(config)
