"""grain sources and pipelines: packing, shuffling, host sharding, resumable iterators, SFT rows."""

import gzip
import json

import grain
import jax
import numpy as np
import pytest

from dcjax.data import pipeline, sft, sources
from dcjax.data.tokenizer import Tokenizer
from dcjax.parallel import mesh as mesh_lib


class CharTokenizer(Tokenizer):
  """One id per character (ord % 200 + 10); specials as in the sentencepiece layout."""

  mask_id, pad_id, eos_id, chat_end_id, im_start_id = 4, 1, 1, 3, 2

  @property
  def vocab_size(self):
    return 210

  def encode(self, text):
    return [ord(c) % 200 + 10 for c in text]

  def decode(self, ids, skip_special_tokens=False):
    return "".join(chr(i - 10) for i in ids if i >= 10)

  def token_to_id(self, token):
    return {"<|dlm_pad|>": 5}.get(token)


def _docs(n=20):
  return [{"text": f"doc{i}:" + "x" * (i % 5 + 3)} for i in range(n)]


def test_jsonl_gz_and_array_record_sources(tmp_path):
  records = _docs(7)
  plain, zipped = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
  plain.write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
  with gzip.open(zipped, "wt") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records[3:]))
  source = sources.JsonlSource(f"{tmp_path}/*.jsonl*")
  assert len(source) == 7 and [source[i] for i in range(7)] == records

  from array_record.python.array_record_module import ArrayRecordWriter
  path = str(tmp_path / "c.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  writer.write(json.dumps(records[0]).encode())
  writer.write(b"plain text record")
  writer.close()
  ar = sources.ArrayRecordSource(path)
  assert len(ar) == 2 and ar[0] == records[0] and ar[1] == {"text": "plain text record"}

  with pytest.raises(FileNotFoundError, match="config.data.paths"):
    sources.JsonlSource(str(tmp_path / "missing*.jsonl"))


def test_stdlib_source_is_the_default_corpus():
  source = sources.StdlibSource()
  assert len(source) > 500
  record = source[0]
  assert record["path"].endswith(".py") and isinstance(record["text"], str)


def test_packing_keeps_document_boundaries_and_is_seeded():
  docs = grain.MapDataset.source(_docs())
  tok = CharTokenizer()
  ds = pipeline.pretrain_dataset(docs, tok, seq_len=16, batch_size=2, seed=3)
  batch = next(iter(ds))
  assert batch["tokens"].shape == (2, 16) and batch["tokens"].dtype == np.int32
  seg, pos, tokens = batch["segment_ids"], batch["positions"], batch["tokens"]
  # Every document ends with eos, positions restart at each new segment.
  for row in range(2):
    for i in range(1, 16):
      if seg[row, i] != seg[row, i - 1]:
        assert tokens[row, i - 1] == tok.eos_id and pos[row, i] == 0
  assert not batch["prompt_mask"].any()
  again = next(iter(pipeline.pretrain_dataset(docs, tok, seq_len=16, batch_size=2, seed=3)))
  other = next(iter(pipeline.pretrain_dataset(docs, tok, seq_len=16, batch_size=2, seed=4)))
  np.testing.assert_array_equal(batch["tokens"], again["tokens"])
  assert not np.array_equal(batch["tokens"], other["tokens"])


def test_host_shards_are_disjoint_and_cover_the_epoch():
  docs = grain.MapDataset.source(_docs(20))
  seen = []
  for index in range(2):
    shard = pipeline.HostShard(index, 2)
    records = pipeline._records(docs, seed=0, shard=shard, repeat=True)  # pylint: disable=protected-access
    seen.append({records[i]["text"] for i in range(10)})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {d["text"] for d in _docs(20)}


def test_iterator_state_resumes_exactly():
  docs = grain.MapDataset.source(_docs())
  ds = pipeline.pretrain_dataset(docs, CharTokenizer(), seq_len=16, batch_size=2, seed=0)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(4)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_sft_rows_mask_prompt_and_pad_with_targets():
  tok = CharTokenizer()
  prompt, response = sft.chat_parts(
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
      tok)
  assert prompt.endswith("<|im_start|>assistant\n") and response == "ok"
  pad = sft.resolve_pad_id(tok, "dlm_pad")
  row = sft.encode_example(prompt, response, tok, seq_len=len(prompt) + 8, pad_id=pad)
  n = len(prompt)
  assert row["prompt_mask"][:n].all() and not row["prompt_mask"][n:].any()
  np.testing.assert_array_equal(row["tokens"][n:], tok.encode("ok") + [tok.chat_end_id] + [pad] * 5)
  assert sft.encode_example(prompt, response, tok, seq_len=n, pad_id=pad) is None
  with pytest.raises(ValueError, match="messages"):
    sft.chat_parts({"question": "?"}, tok)

  docs = grain.MapDataset.source([{"prompt": "p" * k, "response": "r"} for k in (1, 2, 200, 3)])
  ds = pipeline.sft_dataset(docs, tok, seq_len=120, batch_size=3, seed=0, pad_id=pad,
                            fields=dict(messages_field="messages", prompt_field="prompt",
                                        response_field="response"), repeat=False)
  batches = list(ds)
  assert len(batches) == 1  # the 200-character prompt does not fit and is dropped
  assert batches[0]["tokens"].shape == (3, 120)


def test_global_batch_is_sharded_over_data_and_fsdp():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  local = {k: np.arange(8 * 4).reshape(8, 4).astype(np.int32) for k in pipeline.BATCH_KEYS}
  local["prompt_mask"] = local["prompt_mask"] % 2 == 0
  batch = pipeline.to_global(local, mesh)
  assert batch["tokens"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert len(batch["tokens"].addressable_shards) == 8
  assert batch["tokens"].addressable_shards[0].data.shape == (2, 4)
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
