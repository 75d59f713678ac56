"""mode=export and the stage hand-offs (config.init_from / config.checkpoint_dir).

Fast tests share one 2-step train run (checkpoints at steps 1 and 2); the slow test runs the
whole chain pretrain -> SFT -> GRPO -> eval -> export on a tiny model and checks the export
against the workdir checkpoint (dcjax sampler) and against transformers (logits).
"""

import json
import os
import sysconfig

import jax
import jinja2
import numpy as np
import pytest

from dcjax import config as config_lib
from dcjax.config import ConfigError
from dcjax.data import tokenizer as tokenizer_lib
from dcjax.diffusion.sampler_config import sampler_kwargs, sampler_section
from dcjax.model import hf
from dcjax.modes import export as export_mode
from dcjax.modes import train as train_mode
from dcjax.parallel import mesh as mesh_lib
from dcjax.train import handoff
from tests.tiny_train import tiny_train_config

JSON_DIR = os.path.join(sysconfig.get_paths()["stdlib"], "json")


def _train_config(steps, **data):
  c = tiny_train_config(steps)
  c.data.update(dict(stdlib_root=JSON_DIR, eval_docs=1, seq_len=32, shuffle_window=0,
                     tokenizer_vocab_size=512, tokenizer_train_chars=100_000, **data))
  c.checkpoint.update(dict(interval=1, keep=3, async_save=False))
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step train run: (workdir, result of train(), params at step 1 as fetched then)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  seen = {}
  c = _train_config(2)

  result = train_mode.train(c, workdir)
  seen["final"] = jax.device_get(result["state"].params)
  return workdir, result, seen


def _mesh():
  return mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices()[:4])


def test_spec_parsing():
  assert handoff.parse("/a/b") == ("/a/b", None)
  assert handoff.parse("/a/b:12") == ("/a/b", 12)
  assert handoff.parse("gs://bucket/run") == ("gs://bucket/run", None)
  assert handoff.parse("gs://bucket/run:3") == ("gs://bucket/run", 3)


@pytest.mark.parametrize("mode,field,other", [
    ("train", "init_from", "hf_dir"), ("sample", "checkpoint_dir", "hf_dir"),
    ("sample", "init_from", None), ("train", "checkpoint_dir", None)])
def test_source_fields_are_checked(mode, field, other):
  c = config_lib.base_config()
  c.mode = mode
  c[field] = "/some/run"
  if other:
    c[other] = "/some/hf"
  with pytest.raises(ConfigError, match=f"config.{field}='/some/run'") as e:
    config_lib.check_model_source(c)
  assert ("config.hf_dir" in str(e.value)) == bool(other)


def test_missing_workdir_and_step_are_named(run, tmp_path):
  workdir, _, _ = run
  with pytest.raises(ConfigError, match=f"{tmp_path}/checkpoints does not exist"):
    handoff.open_source(str(tmp_path), "config.init_from")
  with pytest.raises(ConfigError, match=r"no checkpoint step 7 in .*available steps: \[1, 2\]"):
    handoff.open_source(f"{workdir}:7", "config.init_from")


def test_source_reads_meta_tokenizer_and_params_on_a_mesh(run):
  workdir, result, seen = run
  source = handoff.open_source(workdir, "config.init_from")
  assert source.step == 2
  assert source.meta["tokenizer"] == "tokenizer/sp512.model"  # relative: the workdir moves
  assert source.tokenizer_path == os.path.join(workdir, "tokenizer", "sp512.model")
  assert source.model_config == result["model_config"]
  params = source.load_params(source.model_config, _mesh())
  emb = params["embed_tokens"]["embedding"]
  assert len(emb.sharding.device_set) == 4  # restored sharded, not on one device
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), seen["final"])
  step1 = handoff.open_source(f"{workdir}:1", "config.init_from").load_params()
  assert not np.array_equal(np.asarray(step1["norm"]["weight"]), seen["final"]["norm"]["weight"])


def test_export_directory(run, tmp_path):
  workdir, result, seen = run
  c = _train_config(2)
  c.mode, c.export_dir = "export", str(tmp_path / "hf")
  c.sampler = sampler_section(max_new_tokens=24, steps=12, temperature=0.0, top_p=0.9)
  config_lib.validate(c)
  export_mode.export(c, workdir, mesh=_mesh())
  out = tmp_path / "hf"
  raw = json.loads((out / "config.json").read_text())
  assert raw["auto_map"] == {"AutoConfig": "configuration_dream.DreamConfig",
                             "AutoModel": "modeling_dream.DreamModel"}
  # The reader accepts what the writer wrote, and the weights round-trip exactly.
  config, params = hf.load_pretrained(str(out))
  assert config == result["model_config"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), seen["final"])
  # The run's tokenizer, loadable from the directory, with the same ids.
  tok, run_tok = tokenizer_lib.load_tokenizer(str(out)), result["tokenizer"]
  text = "def f(x):\n    return x<|mask|><|im_end|>"
  assert tok.encode(text) == run_tok.encode(text)
  assert (tok.mask_id, tok.pad_id, tok.eos_id) == (run_tok.mask_id, run_tok.pad_id,
                                                   run_tok.eos_id)
  tcfg = json.loads((out / "tokenizer_config.json").read_text())
  assert tcfg["dcjax_special_ids"]["mask"] == run_tok.mask_id == config.mask_token_id
  assert tcfg["mask_token"] == "<|mask|>" and tcfg["bos_token"] is None
  template = jinja2.Environment().from_string(tcfg["chat_template"])
  for messages in ([{"role": "user", "content": "hi"}],
                   [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"},
                    {"role": "assistant", "content": "c"}]):
    for gen in (True, False):
      assert template.render(messages=messages, add_generation_prompt=gen) == (
          run_tok.apply_chat_template(messages, add_generation_prompt=gen))
  gcfg = json.loads((out / "generation_config.json").read_text())
  assert {k: gcfg[k] for k in sampler_kwargs(c.sampler)} == sampler_kwargs(c.sampler)
  assert gcfg["top_p"] == 0.9 and gcfg["top_k"] is None and gcfg["steps"] == 12
  assert gcfg["mask_token_id"] == run_tok.mask_id


def test_export_step_and_its_errors(run, tmp_path):
  workdir, _, seen = run
  c = _train_config(2)
  c.mode, c.export_dir, c.export_step = "export", str(tmp_path / "s1"), 1
  export_mode.export(c, workdir, mesh=_mesh())
  _, params = hf.load_pretrained(str(tmp_path / "s1"))
  expected = handoff.open_source(f"{workdir}:1", "x").load_params()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(expected))
  c.export_step = 5
  with pytest.raises(ConfigError, match=r"config.export_step.*available steps: \[1, 2\]"):
    export_mode.export(c, workdir, mesh=_mesh())
  c.export_dir = ""
  with pytest.raises(ConfigError, match="config.export_dir is empty"):
    export_mode.validate(c)


def test_init_from_starts_a_new_run_from_the_params(run, tmp_path):
  """Params of W:1, fresh optimiser at step 0: with lr ~ 0 one step leaves them as they were;
  the new run reuses W's tokenizer (recorded with its absolute path) and trains none."""
  workdir, _, _ = run
  c = _train_config(1)
  c.seed = 5  # a different random init, had it been used
  c.init_from = f"{workdir}:1"
  c.train.update(dict(lr=1e-12, warmup_steps=0, weight_decay=0.0))
  config_lib.validate(c)
  result = train_mode.train(c, str(tmp_path / "next"))
  assert int(result["state"].step) == 1
  expected = jax.device_get(handoff.open_source(f"{workdir}:1", "x").load_params())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8),
               jax.device_get(result["state"].params), expected)
  assert not (tmp_path / "next" / "tokenizer").exists()
  meta = handoff.open_source(str(tmp_path / "next"), "x").meta
  assert meta["tokenizer"] == os.path.join(workdir, "tokenizer", "sp512.model")


@pytest.mark.slow
def test_chain_of_stages_and_the_export_match_the_checkpoint(tmp_path):
  """pretrain -> SFT (init_from) -> GRPO (init_from) -> eval (checkpoint_dir) -> export, few
  steps each; the export samples the same greedy tokens as the GRPO workdir and gives
  transformers' Qwen2 the same logits as dcjax."""
  import importlib

  import torch
  from transformers import AutoModelForCausalLM

  from configs import eval_humaneval
  from configs import sample as sample_config
  from dcjax import model as model_lib
  from dcjax.diffusion.loading import load_model_and_tokenizer
  from dcjax.diffusion.sampler import generate
  from dcjax.eval import runner
  from dcjax.eval.sampler_fn import make_generate_fn
  from dcjax.modes import grpo as grpo_mode
  from dcjax.rl import prompts, synthetic
  from dcjax.rl.reward_worker import RewardResult
  from tests.hf_reference import bidirectional_logits

  one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  pre, sft, grpo = (str(tmp_path / n) for n in ("pretrain", "sft", "grpo"))
  train_mode.train(_train_config(2), pre)

  sft_data = tmp_path / "sft.jsonl"
  sft_data.write_text("".join(json.dumps({
      "prompt": prompts.build_question(t["question"], t["tests"]),
      "response": prompts.fenced_answer(t["solution"])}) + "\n"
      for t in synthetic.synthetic_tasks(24)))
  c = _train_config(2)
  c.init_from = pre
  c.data.update(dict(kind="sft", source="jsonl", paths=str(sft_data), seq_len=160))
  config_lib.validate(c)
  train_mode.train(c, sft)

  c = importlib.import_module("configs.grpo_tiny").get_config()
  c.init_from = sft
  c.rl.update(dict(steps=1, num_prompts=2, num_generations=2, log_completions=0))
  c.sampler.update(dict(max_new_tokens=8, steps=8))
  c.prompts.update(dict(synthetic_tasks=8, max_prompt_len=128))
  c.warm_start.steps = 0
  c.checkpoint.update(dict(interval=1, async_save=False))
  config_lib.validate(c)

  def reward_fn(host, tasks):
    frac = (host.completion_BxN % 3 == 0).mean(axis=1)
    return RewardResult(total=frac, per_name={"thirds": frac})

  grpo_mode.train_grpo(c, grpo, reward_fn=reward_fn, mesh=one)
  source = handoff.open_source(grpo, "x")
  assert source.tokenizer_path == os.path.join(pre, "tokenizer", "sp512.model")
  sft_params = handoff.open_source(sft, "x").load_params()
  pre_params = handoff.open_source(pre, "x").load_params()
  assert not np.array_equal(sft_params["norm"]["weight"], pre_params["norm"]["weight"])

  e = eval_humaneval.get_config()
  e.checkpoint_dir = grpo
  e.sampler.update(dict(max_new_tokens=8, steps=8))
  e.eval.update(dict(limit=1, batch_size=1, workers=1, output_dir=str(tmp_path / "eval")))
  e.mesh.update(dict(data=1, fsdp=1, tensor=1))
  config_lib.validate(e)
  report = runner.run_eval(e, make_generate_fn(e, one), progress=False)
  assert json.loads(open(report.paths["summary"]).read())["checkpoint_dir"] == grpo

  c.mode, c.export_dir, c.init_from = "export", str(tmp_path / "hf"), ""
  config_lib.validate(c)
  export_mode.export(c, grpo, mesh=one)

  def greedy(**source_fields):
    s = sample_config.get_config()
    s.update(source_fields)
    config_lib.validate(s)
    src = handoff.from_config(s, "checkpoint_dir")
    model_config, params, tok = load_model_and_tokenizer(s, one, src)
    ids = np.asarray([tok.encode("def add_3(x):\n")], np.int32)
    out = generate(model_config, params, ids, np.ones_like(ids, bool), max_new_tokens=16,
                   steps=16, alg="entropy", temperature=0.0, rng=jax.random.key(0), mesh=one)
    return np.asarray(out.tokens), model_config, params

  ours, model_config, params = greedy(checkpoint_dir=grpo)
  theirs, _, _ = greedy(hf_dir=str(tmp_path / "hf"))
  np.testing.assert_array_equal(ours, theirs)

  reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
  reference.config._attn_implementation = "eager"  # pylint: disable=protected-access
  tokens = np.random.default_rng(0).integers(0, model_config.vocab_size, (2, 24))
  keep = np.ones(tokens.shape, bool)
  keep[1, :5] = False
  positions = np.where(keep, np.cumsum(keep, axis=1) - 1, 1)
  want = bidirectional_logits(reference, tokens, keep=keep, positions=positions)
  got = np.asarray(model_lib.apply(model_config, params, tokens, attention_mask=keep))
  diff = float(np.abs(got[keep] - want[keep]).max())
  print(f"max |logit diff| export (transformers) vs checkpoint (dcjax): {diff:.2e}")
  assert diff < 1e-4


def test_hugging_face_tokenizer_is_exported_with_template_and_ids(tmp_path):
  """A tokenizer.json directory: its files copied, its config kept and completed; dcjax and
  transformers read the export with the same ids and chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import AutoTokenizer

  from dcjax.model.config import ModelConfig

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=list(tokenizer_lib.SP_RESERVED_TOKENS)))
  src = tmp_path / "tok"
  src.mkdir()
  bpe.save(str(src / "tokenizer.json"))
  (src / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|im_end|>", "pad_token": "<|dlm_pad|>",
      "tokenizer_class": "PreTrainedTokenizerFast"}))
  tok = tokenizer_lib.load_tokenizer(str(src))
  out = tmp_path / "out"
  out.mkdir()
  model_config = ModelConfig(vocab_size=300, hidden_size=8, intermediate_size=8, num_layers=1,
                             num_heads=1, num_kv_heads=1, head_dim=8, bos_token_id=None)
  export_mode.write_tokenizer(tok, model_config, str(out))
  again = tokenizer_lib.load_tokenizer(str(out))
  assert (again.eos_id, again.pad_id, again.mask_id) == (tok.eos_id, tok.pad_id, tok.mask_id)
  assert again.eos_id == bpe.token_to_id("<|im_end|>") != bpe.token_to_id("<|endoftext|>")
  cfg = json.loads((out / "tokenizer_config.json").read_text())
  assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert cfg["dcjax_special_ids"]["pad"] == bpe.token_to_id("<|dlm_pad|>")
  theirs = AutoTokenizer.from_pretrained(str(out))
  messages = [{"role": "user", "content": "Write f."}]
  assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
      tok.apply_chat_template(messages))
  assert theirs.mask_token == "<|mask|>" and theirs.eos_token == "<|im_end|>"
