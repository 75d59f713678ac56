"""Both tokenizer backends: special ids, round trips, the ChatML template."""

import glob
import json
import sysconfig

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dcjax.data import tokenizer as tok

RESERVED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<|dlm_pad|>"]
SAMPLE = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n\treturn a + b  # ünïcödé ✓ 😀\n\n"
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWrite add.<|im_end|>\n<|im_start|>assistant\n")


def _stdlib_texts(n=30):
  files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:n]
  return [open(f, encoding="utf-8", errors="replace").read() for f in files]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "tok.model"
  return tok.train_sentencepiece(_stdlib_texts(), vocab_size=800, model_path=str(path))


def test_sentencepiece_special_ids_and_roundtrip(sp):
  assert (sp.eos_id, sp.pad_id, sp.im_start_id, sp.chat_end_id, sp.mask_id) == (1, 1, 2, 3, 4)
  assert sp.vocab_size == 800
  ids = sp.encode(SAMPLE)
  assert sp.decode(ids) == SAMPLE  # whitespace, tabs, non-ASCII and emoji survive (byte fallback)
  assert sp.encode("x<|mask|>y").count(4) == 1
  assert sp.decode(sp.encode("a<|im_end|>"), skip_special_tokens=True) == "a"


def test_sentencepiece_reload_and_errors(sp, tmp_path):
  path = tmp_path / "copy.model"
  path.write_bytes(sp._sp.serialized_model_proto())  # pylint: disable=protected-access
  reloaded = tok.load_tokenizer(str(path))
  assert reloaded.encode(SAMPLE) == sp.encode(SAMPLE)
  with pytest.raises(FileNotFoundError, match="neither a sentencepiece"):
    tok.load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="vocab_size=100 must exceed 262"):
    tok.train_sentencepiece(["x"], vocab_size=100, model_path=str(tmp_path / "t.model"))


def test_chat_template_is_chatml(sp):
  assert sp.apply_chat_template([{"role": "user", "content": "Write add."}]) == CHAT
  with_system = sp.apply_chat_template(
      [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
      add_generation_prompt=False)
  assert with_system == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
  with pytest.raises(ValueError, match="needs 'role' and 'content'"):
    sp.apply_chat_template([{"content": "x"}])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A byte-level BPE tokenizer directory in the released checkpoints' format."""
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=RESERVED_TOKENS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(_stdlib_texts(), trainer)
  path = tmp_path_factory.mktemp("hf_tok")
  bpe.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|im_end|>", "pad_token": "<|dlm_pad|>", "mask_token": "<|mask|>",
      "tokenizer_class": "PreTrainedTokenizerFast"}))
  return path


def test_hf_tokenizer_matches_transformers(hf_dir):
  ours = tok.load_tokenizer(str(hf_dir))
  ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
  assert ours.mask_id == ref.convert_tokens_to_ids("<|mask|>")
  assert ours.pad_id == ref.convert_tokens_to_ids("<|dlm_pad|>")
  assert ours.eos_id == ours.chat_end_id == ref.convert_tokens_to_ids("<|im_end|>")
  text = CHAT + SAMPLE + "<|im_end|>"
  assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
  assert ours.decode(ours.encode(text)) == text
  assert ours.decode(ours.encode(text), skip_special_tokens=True) == \
      ref.decode(ref.encode(text, add_special_tokens=False), skip_special_tokens=True)


def test_hf_tokenizer_errors(hf_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tok.HFTokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<MASK>"}))
  with pytest.raises(ValueError, match="mask_token='<MASK>' is not in the vocabulary"):
    tok.HFTokenizer(str(tmp_path))
