"""Exact resume: the data iterator's state survives its JSON checkpoint; a run stopped by a
signal or a crash and resumed equals an uninterrupted one step by step (pretraining and SFT);
each step keeps one metrics record; a preempted run exits with its own status."""

import json
import os
import signal
import sysconfig

import grain
import numpy as np
import pytest

from dcjax.data import pipeline
from dcjax.data import tokenizer as tokenizer_lib
from dcjax.modes import train as loop
from dcjax.train import metrics, preemption
from tests.test_data import CharTokenizer
from tests.tiny_train import tiny_train_config

JSON_DIR = os.path.join(sysconfig.get_paths()["stdlib"], "json")
STEPS, INTERVAL = 8, 4


def _documents(n=40):
  """7 or 23 characters + eos: a row of 16 tokens ends at a document's end (no leftover piece
  for the next row) or inside one, both often."""
  return grain.MapDataset.source([{"text": "d" * (23 if i % 3 == 0 else 7)} for i in range(n)])


def _leftover_pieces(state):
  """The packer's `remainder_slices` anywhere in an iterator state."""
  if not isinstance(state, dict):
    return []
  found = [state["remainder_slices"]] if "remainder_slices" in state else []
  return found + [s for value in state.values() for s in _leftover_pieces(value)]


@pytest.mark.parametrize("window", [0, 24])  # 24 rows: windows of 12 batches
def test_packing_state_survives_the_json_checkpoint(window, tmp_path):
  ds = pipeline.pretrain_dataset(_documents(), CharTokenizer(), seq_len=16, batch_size=2,
                                 seed=0, shuffle_window=window)
  expected = [b["tokens"] for b in pipeline.take_batches(ds, 24)]
  handler = grain.checkpoint.CheckpointHandler()  # the JSON file orbax writes per host
  saved = []
  for start in range(0, 21, 5):
    iterator = iter(ds)
    for _ in range(start):
      next(iterator)
    saved += [tuple(s["tokens"]) for s in _leftover_pieces(iterator.get_state())]
    directory = tmp_path / str(start)
    directory.mkdir()
    handler.save(directory, args=grain.checkpoint.CheckpointSave(iterator))
    resumed = handler.restore(directory, args=grain.checkpoint.CheckpointRestore(iter(ds)))
    for want in expected[start:start + 4]:
      np.testing.assert_array_equal(next(resumed)["tokens"], want)
  # States with and without a leftover piece ((-1, -1)) were both restored.
  assert (-1, -1) in saved and any(s != (-1, -1) for s in saved)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "sp512.model")
  texts = [open(os.path.join(JSON_DIR, f), encoding="utf-8").read()
           for f in sorted(os.listdir(JSON_DIR)) if f.endswith(".py")]
  tokenizer_lib.train_sentencepiece(texts, 512, path)
  return path


def _sft_records(path):
  """Prompt / response pairs from the json package's lines; every 7th prompt is too long for
  a row, so the pipeline's filter drops it."""
  with open(os.path.join(JSON_DIR, "decoder.py"), encoding="utf-8") as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  with open(path, "w") as f:
    for i, line in enumerate(lines):
      prompt = f"line {i}" + (" of json/decoder.py" * 8 if i % 7 == 0 else "")
      f.write(json.dumps({"prompt": prompt, "response": line}) + "\n")


def _config(kind, tokenizer_path, tmp_path):
  c = tiny_train_config(STEPS)
  # 64 rows = 8 steps per shuffle window: the resumes below restore window 0, whose saved
  # packing state is the first one, with no leftover piece (the case JSON used to break).
  c.data.update(dict(kind=kind, eval_docs=1, seq_len=32, shuffle_window=64,
                     tokenizer=tokenizer_path))
  if kind == "pretrain":
    c.data.stdlib_root = JSON_DIR
  else:
    # The chat template's default system prompt alone is ~40 tokens.
    c.data.update(dict(source="jsonl", paths=str(tmp_path / "sft.jsonl"), seq_len=64))
    _sft_records(c.data.paths)
  c.checkpoint.update(dict(interval=INTERVAL, keep=3))
  return c


class _Crash(Exception):
  pass


def _run(config, workdir, at=None, action=None):
  """loop.run with the training batches recorded; `action()` runs as batch `at` is drawn.

  Returns (training batches drawn, exit status: 0, the SystemExit code, or "crash").
  """
  batches, original = [], pipeline.dataset_from_config

  def record(batch):
    batches.append({k: np.array(batch[k]) for k in pipeline.BATCH_KEYS})
    if len(batches) == at:
      action()
    return batch

  def dataset(*args, repeat=True, **kwargs):
    ds = original(*args, repeat=repeat, **kwargs)
    return ds.map(record) if repeat else ds

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pipeline, "dataset_from_config", dataset)
    try:
      loop.run(config, str(workdir))
      status = 0
    except SystemExit as e:
      status = e.code
    except _Crash:
      status = "crash"
  return batches, status


def _losses(workdir):
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def _crash():
  raise _Crash()


@pytest.mark.slow
@pytest.mark.parametrize("kind,signal_name", [("pretrain", "SIGINT"), ("sft", "SIGTERM")])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(kind, signal_name, tokenizer_path,
                                                             tmp_path):
  config = _config(kind, tokenizer_path, tmp_path)
  signum = signal.Signals[signal_name]
  config.checkpoint.interval = 100  # (saves only at the end; the data and losses are the same)
  straight, status = _run(config, tmp_path / "straight")
  assert status == 0 and len(straight) == STEPS
  expected = _losses(tmp_path / "straight")
  assert [step for step, _ in expected] == list(range(1, STEPS + 1))

  config.checkpoint.interval = INTERVAL
  # 1. A signal while step 2's batch is drawn: step 2 finishes, is saved, exit status 75.
  workdir = tmp_path / "stopped"
  batches, status = _run(config, workdir, at=2, action=lambda: os.kill(os.getpid(), signum))
  assert status == preemption.EXIT_PREEMPTED
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  # 2. Resumed from the signal's save, it saves step 4 and crashes while drawing step 7's
  # batch: step 5 is logged (one step late), step 6 is not, nothing after step 4 is saved.
  resumed, status = _run(config, workdir, at=7 - 2, action=_crash)
  assert status == "crash" and [s for s, _ in _losses(workdir)][-1] == 5
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  batches += resumed[:4 - 2]
  # 3. Resumed from the periodic save at step 4: steps 5 and 6 again, then to the end.
  resumed, status = _run(config, workdir)
  assert status == 0
  batches += resumed

  assert len(batches) == STEPS
  for step, (got, want) in enumerate(zip(batches, straight), 1):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {step} {key}")
  assert _losses(workdir) == expected  # one record per step, bit-identical losses


def test_superseded_metric_records_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train/loss": float(s)}) for s in (1, 2, 3, 4)]
  path.write_text("\n".join(lines + [json.dumps({"step": 2, "eval/loss": 0.5})]) + '\n{"st')
  writer = metrics.MetricWriter(str(tmp_path), start_step=2)  # resumed from step 2's checkpoint
  writer.write(3, {"loss": 9.0})
  writer.close()
  assert writer.dropped == 3  # steps 3 and 4, and the line a kill cut short
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      {"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0},
      {"step": 2, "eval/loss": 0.5}, {"step": 3, "train/loss": 9.0}]
  assert metrics.drop_records_after(str(path), 0) == 4  # a run from scratch starts anew
  assert path.read_text() == ""


def test_sigterm_and_sigint_request_a_save_then_ctrl_c_stops(tmp_path):
  before = signal.getsignal(signal.SIGINT)
  for signum in preemption.SIGNALS:
    with preemption.Preemption() as signals:
      assert signals.requested is None
      os.kill(os.getpid(), signum)
      assert signals.requested == signal.Signals(signum).name
      if signum == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for a save
          os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


def test_grpo_exit_status_tells_preempted_from_completed(monkeypatch, tmp_path):
  from dcjax.modes import grpo as rl_loop  # pylint: disable=import-outside-toplevel
  result = dict(history=[], checkpoint_dir=str(tmp_path))
  monkeypatch.setattr(rl_loop, "train_grpo", lambda *a: dict(result, stopped="preempted"))
  with pytest.raises(SystemExit) as stop:
    rl_loop.run(None, str(tmp_path))
  assert stop.value.code == preemption.EXIT_PREEMPTED == 75
  monkeypatch.setattr(rl_loop, "train_grpo", lambda *a: dict(result, stopped="completed"))
  assert rl_loop.run(None, str(tmp_path)) is None
