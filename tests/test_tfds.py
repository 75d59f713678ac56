"""The tfds source (`config.data.source="tfds"`): a TFDS dataset built here, offline, as
ArrayRecord, read through `tfds.data_source`, split per host, and trained on."""

import inspect

import grain
import pytest
import tensorflow_datasets as tfds

from dcjax.data import pipeline, sources
from dcjax.modes import train as loop
from tests.tiny_train import tiny_train_config


class DcjaxTinyCode(tfds.core.GeneratorBasedBuilder):
  """Source files of the stdlib's `json` package cut into functions-sized pieces."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, text in enumerate(_documents()):
      yield i, {"text": text}


def _documents():
  import json.decoder  # pylint: disable=import-outside-toplevel
  source = inspect.getsource(json.decoder)
  pieces = [source[i:i + 400] for i in range(0, len(source), 400)]
  assert len(pieces) >= 12 and len(set(pieces)) == len(pieces)
  return pieces


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  DcjaxTinyCode(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def _data_config(data_dir):
  c = tiny_train_config(2)
  c.data.update(dict(source="tfds", tfds_name="dcjax_tiny_code", tfds_split="train",
                     tfds_data_dir=data_dir))
  return c


def test_tfds_records_are_the_documents_and_split_per_host(tfds_dir):
  source = sources.make_source(_data_config(tfds_dir).data)
  docs = _documents()
  assert len(source) == len(docs)
  assert sorted(source[i]["text"] for i in range(len(source))) == sorted(docs)
  shards = [[r["text"] for r in pipeline._records(grain.MapDataset.source(source), 0,  # pylint: disable=protected-access
                                                   pipeline.HostShard(i, 2), repeat=False)]
            for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(docs)
  with pytest.raises(Exception, match="no_such_dataset_dcjax"):
    sources.TfdsSource("no_such_dataset_dcjax", data_dir=tfds_dir)


@pytest.mark.slow
def test_training_reads_a_tfds_dataset(tfds_dir, tmp_path):
  c = _data_config(tfds_dir)
  c.data.update(dict(eval_docs=1, seq_len=32, shuffle_window=16, tokenizer_vocab_size=512,
                     tokenizer_train_chars=50_000))
  result = loop.train(c, str(tmp_path / "run"))
  assert result["stopped"] == "completed" and result["steps_done"] == 2
  assert result["last_metrics"]["targets"] > 0
