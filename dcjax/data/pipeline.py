"""grain pipelines for pretraining (tokenise + pack) and SFT (chat rows), per host.

    records --shuffle(seed, per epoch)--> repeat --[host i of n]--> tokenise
            --> pack into [L] rows + window-shuffle the rows (pretraining)
                / fixed-length chat rows (SFT) --> batch

Packing cuts a long file into consecutive rows; the window shuffle spreads them over many
batches so that one batch is not one file (which makes the loss spiky).

Each host reads every n-th record of one global shuffled stream, so hosts never overlap;
the host-local batches become one global array sharded over ('data', 'fsdp') with
`jax.make_array_from_process_local_data`. The iterator's `get_state()` is checkpointed
with the model, so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcjax.data import sft as sft_lib

BATCH_KEYS = ("tokens", "segment_ids", "positions", "prompt_mask")
# A fixed permutation (independent of the training seed) picks the held-out documents.
SPLIT_SEED = 20250601


@dataclasses.dataclass(frozen=True)
class HostShard:
  index: int = 0
  count: int = 1

  @classmethod
  def current(cls) -> "HostShard":
    return cls(jax.process_index(), jax.process_count())


def split_source(source, eval_docs: int) -> tuple[grain.MapDataset, grain.MapDataset]:
  """(train, held-out) documents: the first `eval_docs` of a fixed permutation are held out."""
  if eval_docs < 0 or eval_docs >= len(source):
    raise ValueError(f"config.data.eval_docs={eval_docs} must lie in [0, {len(source)}) "
                     f"for a source of {len(source)} records")
  docs = grain.MapDataset.source(source).shuffle(seed=SPLIT_SEED)
  return docs[eval_docs:], docs[:eval_docs]


class Tokenize(grain.transforms.Map):
  """record[text_field] -> {"tokens": ids (+ eos)}."""

  def __init__(self, tokenizer, text_field: str = "text", add_eos: bool = True):
    self._tokenizer, self._field, self._add_eos = tokenizer, text_field, add_eos

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if self._field not in record:
      raise KeyError(f"record has no field {self._field!r} (config.data.text_field); "
                     f"keys: {sorted(record)}")
    ids = self._tokenizer.encode(record[self._field])
    if self._add_eos:
      ids = ids + [self._tokenizer.eos_id]
    return {"tokens": np.asarray(ids, np.int32)}


class EncodeChat(grain.transforms.Map):
  """A chat / prompt-response record -> one fixed-length SFT row, or None (prompt too long)."""

  def __init__(self, tokenizer, seq_len: int, pad_id: int, fields: Mapping[str, str]):
    self._tokenizer, self._seq_len, self._pad_id = tokenizer, seq_len, pad_id
    self._fields = dict(fields)

  def map(self, record):
    prompt, response = sft_lib.chat_parts(record, self._tokenizer, **self._fields)
    return sft_lib.encode_example(prompt, response, self._tokenizer, self._seq_len, self._pad_id)


def _packed_row(element: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = element["tokens"]
  return dict(tokens=tokens, segment_ids=element["tokens_segment_ids"],
              positions=element["tokens_positions"], prompt_mask=np.zeros(tokens.shape, bool))


class _JsonSafePacking(grain.IterDataset):
  """Passes a ConcatThenSplitIterDataset through; its state survives a JSON round trip.

  The packer marks "no leftover piece" with the tuple `(-1, -1)` in `remainder_slices` and
  tests for it with `!=`. The checkpoint stores the state as JSON, which turns the tuples
  into lists, so a restored packer would take every empty remainder for a real one and
  shift the packing. `set_state` turns the lists back into tuples.
  """

  def __iter__(self):
    return _JsonSafePackingIterator(self._parent.__iter__())


class _JsonSafePackingIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state(dict(state, remainder_slices=slices))


def _records(docs: grain.MapDataset, seed: int, shard: HostShard, repeat: bool):
  ds = docs.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  return ds[shard.index::shard.count]


def pretrain_dataset(docs: grain.MapDataset, tokenizer, *, seq_len: int, batch_size: int,
                     seed: int, shard: HostShard = HostShard(), text_field: str = "text",
                     add_eos: bool = True, repeat: bool = True,
                     shuffle_window: int = 0) -> grain.IterDataset:
  """Host-local [batch_size, seq_len] packed batches of documents separated by eos.

  `shuffle_window` > 1 shuffles packed rows within consecutive windows of that many rows.
  """
  ds = _records(docs, seed, shard, repeat).map(Tokenize(tokenizer, text_field, add_eos))
  ds = _JsonSafePacking(grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": seq_len}))
  if shuffle_window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window,
                                                     seed=seed + 1)
  return ds.map(_packed_row).batch(batch_size, drop_remainder=True)


def sft_dataset(docs: grain.MapDataset, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                pad_id: int, fields: Mapping[str, str], shard: HostShard = HostShard(),
                repeat: bool = True) -> grain.IterDataset:
  """Host-local [batch_size, seq_len] SFT rows (prompt_mask marks the prompt)."""
  ds = _records(docs, seed, shard, repeat).map(EncodeChat(tokenizer, seq_len, pad_id, fields))
  ds = ds.to_iter_dataset().filter(lambda row: row is not None)
  return ds.batch(batch_size, drop_remainder=True)


def dataset_from_config(data_config, docs, tokenizer, *, batch_size: int, seed: int,
                        shard: HostShard, repeat: bool = True) -> grain.IterDataset:
  """The pretraining or SFT pipeline that `config.data.kind` names."""
  if data_config.kind == "pretrain":
    return pretrain_dataset(docs, tokenizer, seq_len=data_config.seq_len, batch_size=batch_size,
                            seed=seed, shard=shard, text_field=data_config.text_field,
                            add_eos=data_config.get("add_eos", True), repeat=repeat,
                            shuffle_window=int(data_config.get("shuffle_window", 0)))
  if data_config.kind == "sft":
    fields = dict(messages_field=data_config.messages_field,
                  prompt_field=data_config.prompt_field,
                  response_field=data_config.response_field)
    pad_id = sft_lib.resolve_pad_id(tokenizer, data_config.sft_pad)
    return sft_dataset(docs, tokenizer, seq_len=data_config.seq_len, batch_size=batch_size,
                       seed=seed, pad_id=pad_id, fields=fields, shard=shard, repeat=repeat)
  raise ValueError(f"config.data.kind={data_config.kind!r} must be 'pretrain' or 'sft'")


def take_batches(dataset: grain.IterDataset, count: int) -> list[dict[str, np.ndarray]]:
  """The first `count` batches (fewer if the dataset ends), e.g. the fixed held-out set."""
  batches = []
  iterator = iter(dataset)
  for _ in range(count):
    try:
      batches.append(next(iterator))
    except StopIteration:
      break
  return batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over ('data', 'fsdp'), the rest replicated: the model's activation_batch rule."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the mesh's batch axes."""
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[key]))
          for key in BATCH_KEYS}
