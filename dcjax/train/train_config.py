"""The `train`, `data` and `checkpoint` config sections of mode "train": defaults + validation."""

from __future__ import annotations

import ml_collections

from dcjax.config import ConfigError
from dcjax.data.sources import SOURCES
from dcjax.diffusion import forward_process as fp
from dcjax.diffusion import losses
from dcjax.model.config import ModelConfig
from dcjax.train import checkpoint


def add_train_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the train/data/checkpoint sections with their defaults to a base config."""
  c.mode = "train"
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, micro_batches=1,       # global batch; k-way accumulation
      lr=3e-4, warmup_steps=100, end_lr_ratio=0.1, weight_decay=0.1,
      b1=0.9, b2=0.95, adam_eps=1e-8, grad_clip=1.0,
      log_every=10, eval_every=100, eval_batches=4, eval_batch_size=0,  # 0: batch/micro
      preempt_at_step=0,          # testing: behave as if SIGTERM arrived after this step
      sample_prompt="def fibonacci(n):\n", sample_new_tokens=48, sample_steps=48,
      loss=ml_collections.ConfigDict(dict(
          normaliser="token", weighting="inverse_t", cart_p=0.3, eps=1e-3,
          anneal_steps=0, truncate_prob=0.01, document_mask=False)),
  ))
  c.data = ml_collections.ConfigDict(dict(
      kind="pretrain",            # "pretrain" (packed documents) or "sft" (chat rows)
      source="stdlib",            # stdlib | jsonl | array_record | tfds
      paths="", stdlib_root="", tfds_name="", tfds_split="train", tfds_data_dir="",
      text_field="text", add_eos=True,
      messages_field="messages", prompt_field="prompt", response_field="response",
      sft_pad="dlm_pad",          # SFT pad target: "dlm_pad" (Instruct) or "pad" (= eos)
      seq_len=512, eval_docs=64, shuffle_seed=-1,  # -1: config.seed
      shuffle_window=1024,        # pretraining: shuffle packed rows within windows of this many
      tokenizer="",               # .model or HF dir; "" -> hf_dir's, else trained + cached
      tokenizer_vocab_size=0, tokenizer_train_chars=4_000_000,
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      interval=500, keep=3, async_save=True, restore=True,
      verify="skip"))             # corrupt newest checkpoint: "skip" to the previous, "fatal"
  return c


def loss_config(config) -> losses.LossConfig:
  loss = config.train.loss
  noise = fp.NoiseConfig(eps=float(loss.eps), anneal_steps=int(loss.anneal_steps),
                         truncate_prob=float(loss.truncate_prob))
  return losses.LossConfig(noise=noise, normaliser=loss.normaliser, weighting=loss.weighting,
                           cart_p=float(loss.cart_p), document_mask=bool(loss.document_mask))


def _positive_int(section, name, prefix, minimum=1):
  value = section.get(name)
  if not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{prefix}.{name}={value!r} must be an integer >= {minimum}")


def check_seq_len(config, model_config: ModelConfig, where: str) -> None:
  """ConfigError when config.data.seq_len exceeds the model's max_position_embeddings."""
  seq_len = config.data.seq_len
  try:
    model_config.check_positions(seq_len, "config.data.seq_len", where)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate(config) -> None:
  """Checks the mode's sections; raises ConfigError naming the first bad field."""
  for name in ("train", "data", "checkpoint"):
    if name not in config:
      raise ConfigError(f"config.{name} is missing (mode 'train' needs train, data and "
                             "checkpoint sections; see dcjax.train.train_config)")
  t, d, k = config.train, config.data, config.checkpoint
  for name in ("steps", "batch_size", "micro_batches", "log_every", "eval_every"):
    _positive_int(t, name, "config.train")
  _positive_int(t, "warmup_steps", "config.train", 0)
  _positive_int(t, "eval_batches", "config.train", 0)
  if t.batch_size % t.micro_batches:
    raise ConfigError(f"config.train.micro_batches={t.micro_batches} must divide "
                           f"config.train.batch_size={t.batch_size}")
  if not t.lr > 0:
    raise ConfigError(f"config.train.lr={t.lr} must be positive")
  if not 0 <= t.end_lr_ratio <= 1:
    raise ConfigError(f"config.train.end_lr_ratio={t.end_lr_ratio} must lie in [0, 1]")
  try:
    loss_config(config).validate("config.train.loss")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if d.kind not in ("pretrain", "sft"):
    raise ConfigError(f"config.data.kind={d.kind!r} must be 'pretrain' or 'sft'")
  if d.source not in SOURCES:
    raise ConfigError(f"config.data.source={d.source!r} is not one of {SOURCES}")
  if d.source in ("jsonl", "array_record") and not d.paths:
    raise ConfigError(f"config.data.paths is empty but config.data.source={d.source!r}")
  _positive_int(d, "seq_len", "config.data", 2)
  _positive_int(d, "eval_docs", "config.data", 0)
  if t.eval_batches and not d.eval_docs:
    raise ConfigError(f"config.train.eval_batches={t.eval_batches} but config.data."
                           "eval_docs=0: no held-out records to evaluate on (set eval_docs > 0, "
                           "or eval_batches=0 for no held-out evaluation)")
  # hf_dir / init_from: checked once the checkpoint's model config is read
  if not (config.get("hf_dir") or config.get("init_from")) and "model" in config:
    try:
      model_config = ModelConfig.from_dict(config.model.to_dict())
    except (TypeError, ValueError):
      model_config = None  # reported by dcjax.config.validate
    if model_config is not None:
      check_seq_len(config, model_config, "config.model")
  if d.kind == "sft" and d.sft_pad not in ("pad", "dlm_pad"):
    raise ConfigError(f"config.data.sft_pad={d.sft_pad!r} must be 'pad' or 'dlm_pad'")
  _positive_int(k, "interval", "config.checkpoint")
  _positive_int(k, "keep", "config.checkpoint", 0)
  checkpoint.validate_section(k, error=ConfigError)
