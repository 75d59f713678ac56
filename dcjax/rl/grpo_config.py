"""The config sections of mode "grpo" (coupled-GRPO, docs/grpo.md): defaults and validation.

Sections added to `base_config()`:
  rl          group size, policy iterations, clipping, KL, advantages, estimator, reference
  optim       AdamW (docs/grpo.md: lr 1e-6, betas (0.9, 0.99), weight decay 0.1, cosine to 10%,
              grad clip 0.2)
  sampler     rollout settings passed to `dcjax.diffusion.sampler.generate`
  prompts     task source, prompt construction and left truncation, tokenizer
  warm_start  optional masked-diffusion SFT on reference solutions before RL (tiny demo)
  checkpoint  orbax interval / keep / async / restore / verify ("skip": a corrupt newest
              checkpoint is reported and the previous one restored; "fatal": stop)

config.sampler is the shared section of dcjax/diffusion/sampler_config.py (sentinels for
"off"); prompts.shuffle_seed=-1 means config.seed.
"""

from __future__ import annotations

import ml_collections

from dcjax.config import ConfigError
from dcjax.data.tokenizer import DEFAULT_SYSTEM_PROMPT
from dcjax.diffusion.sampler_config import sampler_section, validate_sampler
from dcjax.model.config import ModelConfig
from dcjax.rl import advantages, learner, logprobs
from dcjax.train import checkpoint

PROMPT_SOURCES = ("jsonl", "mbpp", "synthetic")




def add_grpo_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the grpo sections with the paper's defaults (docs/grpo.md) to a base config."""
  c.mode = "grpo"
  c.rl = ml_collections.ConfigDict(dict(
      steps=1000,                 # rollout batches; optimiser steps = steps * num_iterations
      num_prompts=8,              # prompts per rollout batch (global)
      num_generations=10,         # G completions per prompt
      num_iterations=2,           # mu: policy iterations (optimiser steps) per rollout batch
      micro_batches=1,            # gradient accumulation inside one optimiser step
      epsilon_low=0.5, epsilon_high=0.5,
      beta=0.01,                  # k3 KL weight; 0 drops the reference model entirely
      advantage="mean",           # "mean" (paper) or "loo" (released code)
      scale_rewards=False,        # divide advantages by the group std (+1e-4)
      estimator="coupled",        # "coupled" | "decoupled" | "full" (d1)
      num_pairs=1,                # lambda: complementary pairs (or independent pass pairs)
      t_min=0.2, t_max=0.8,
      # Log-prob passes see the prompt's keep-mask: a completion's estimate is the same
      # whatever it is batched with. False with prompts.pad_multiple=1 is the release's
      # scoring (no mask, prompts padded to the batch's longest), docs/grpo.md.
      logp_attention_mask=True,
      ref_update_every=64,        # optimiser steps between reference refreshes (0: never)
      ref_update="hard",          # "hard" copy (paper) or "soft" mix (released code)
      ref_mix_alpha=0.6,          # soft: ref <- alpha * policy + (1 - alpha) * ref
      reward_weights=ml_collections.ConfigDict({"code": 2.0, "format": 0.5}),
      reward_timeout_s=5.0,       # per assert (docs/rewards.md)
      reward_workers=0,           # sandbox workers; 0 = one per CPU
      log_every=1,
      log_completions=1,          # completions printed at each log line
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-6, b1=0.9, b2=0.99, adam_eps=1e-8, weight_decay=0.1, warmup_steps=0,
      end_lr_ratio=0.1, grad_clip=0.2))
  c.sampler = sampler_section(max_new_tokens=256, steps=256, alg="entropy", temperature=1.2,
                              top_p=0.95)
  c.prompts = ml_collections.ConfigDict(dict(
      source="jsonl",             # jsonl (AceCode: question, test_cases) | mbpp | synthetic
      path="",
      question_field="question", tests_field="test_cases",
      mbpp_task_ids="601-974",    # MBPP train split
      synthetic_tasks=200, synthetic_seed=0,
      system_prompt=DEFAULT_SYSTEM_PROMPT,
      add_first_test=True,        # question + "\nTest cases: " + first assert (docs/grpo.md)
      max_prompt_len=200,         # left truncation (docs/grpo.md)
      pad_multiple=32,            # prompt batches are left-padded to a multiple of this
      tokenizer="",               # .model or HF dir; "" -> hf_dir's, else trained + cached
      tokenizer_vocab_size=512,   # of the trained one (on the tasks); 0 = never train one
      shuffle_seed=-1,
  ))
  c.warm_start = ml_collections.ConfigDict(dict(
      steps=0, batch_size=32, lr=3e-3, log_every=50))
  c.checkpoint = ml_collections.ConfigDict(dict(
      interval=50, keep=3, async_save=True, restore=True,
      verify="skip"))             # corrupt newest checkpoint: "skip" to the previous, "fatal"
  return c


def _int(section, name, prefix, minimum=1):
  value = section.get(name)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{prefix}.{name}={value!r} must be an integer >= {minimum}")


def _number(section, name, prefix, low=None, high=None, low_open=False):
  value = section.get(name)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"{prefix}.{name}={value!r} must be a number")
  if low is not None and (value < low or (low_open and value == low)):
    raise ConfigError(f"{prefix}.{name}={value!r} must be {'>' if low_open else '>='} {low}")
  if high is not None and value > high:
    raise ConfigError(f"{prefix}.{name}={value!r} must be <= {high}")


def _choice(section, name, prefix, choices):
  if section.get(name) not in choices:
    raise ConfigError(f"{prefix}.{name}={section.get(name)!r} is not one of {choices}")


def _check_canvas(config) -> None:
  """The longest rollout canvas (max_prompt_len + max_new_tokens) fits the model's positions."""
  try:
    model_config = ModelConfig.from_dict(config.model.to_dict())
  except (TypeError, ValueError):
    return  # reported by dcjax.config.validate
  p, n = config.prompts.max_prompt_len, config.sampler.max_new_tokens
  try:
    model_config.check_positions(p + n, f"config.prompts.max_prompt_len={p} + "
                                 f"config.sampler.max_new_tokens={n}", "config.model")
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate(config) -> None:
  """Checks the grpo sections; raises ConfigError naming the first bad field."""
  for name in ("rl", "optim", "sampler", "prompts", "warm_start", "checkpoint"):
    if name not in config:
      raise ConfigError(f"config.{name} is missing (mode 'grpo' needs it; see "
                            "dcjax.rl.grpo_config.add_grpo_sections)")
  r, o, s, p = config.rl, config.optim, config.sampler, config.prompts
  for name in ("steps", "num_prompts", "num_generations", "num_iterations", "micro_batches",
               "num_pairs", "log_every"):
    _int(r, name, "config.rl")
  _int(r, "ref_update_every", "config.rl", 0)
  _int(r, "reward_workers", "config.rl", 0)
  _int(r, "log_completions", "config.rl", 0)
  if r.num_generations < 2:
    raise ConfigError(f"config.rl.num_generations={r.num_generations} must be >= 2 "
                          "(advantages compare completions of one prompt)")
  batch = r.num_prompts * r.num_generations
  if batch % r.micro_batches:
    raise ConfigError(f"config.rl.micro_batches={r.micro_batches} must divide the rollout "
                          f"batch config.rl.num_prompts * config.rl.num_generations = {batch}")
  _number(r, "epsilon_low", "config.rl", 0, 1)
  _number(r, "epsilon_high", "config.rl", 0)
  _number(r, "beta", "config.rl", 0)
  _choice(r, "advantage", "config.rl", advantages.BASELINES)
  _choice(r, "estimator", "config.rl", logprobs.ESTIMATORS)
  _choice(r, "ref_update", "config.rl", learner.REF_UPDATES)
  _number(r, "ref_mix_alpha", "config.rl", 0, 1)
  _number(r, "t_min", "config.rl", 0, 1, low_open=True)
  _number(r, "t_max", "config.rl", 0, 1)
  if not r.t_min <= r.t_max < 1:
    raise ConfigError(f"config.rl.t_min={r.t_min} and config.rl.t_max={r.t_max} must "
                          "satisfy 0 < t_min <= t_max < 1 (the weights are 1/t and 1/(1-t))")
  _number(r, "reward_timeout_s", "config.rl", 0, low_open=True)
  if not r.reward_weights:
    raise ConfigError("config.rl.reward_weights is empty: name at least one reward")
  for name, weight in r.reward_weights.items():
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
      raise ConfigError(f"config.rl.reward_weights.{name}={weight!r} must be a number")

  _number(o, "lr", "config.optim", 0, low_open=True)
  for name in ("b1", "b2"):
    _number(o, name, "config.optim", 0, 1)
  _number(o, "adam_eps", "config.optim", 0, low_open=True)
  _number(o, "weight_decay", "config.optim", 0)
  _int(o, "warmup_steps", "config.optim", 0)
  _number(o, "end_lr_ratio", "config.optim", 0, 1)
  _number(o, "grad_clip", "config.optim", 0)

  validate_sampler(s)

  _choice(p, "source", "config.prompts", PROMPT_SOURCES)
  if p.source in ("jsonl", "mbpp") and not p.path:
    raise ConfigError(f"config.prompts.path is empty but config.prompts.source="
                          f"{p.source!r} reads a JSONL file")
  _int(p, "max_prompt_len", "config.prompts")
  # hf_dir / init_from: the sampler checks each canvas
  if not (config.get("hf_dir") or config.get("init_from")) and "model" in config:
    _check_canvas(config)
  _int(p, "pad_multiple", "config.prompts")
  if not config.rl.logp_attention_mask and p.pad_multiple != 1:
    raise ConfigError(
        f"config.rl.logp_attention_mask=False scores with padding visible, so "
        f"config.prompts.pad_multiple={p.pad_multiple} would change every log-prob; the "
        f"release's scoring needs config.prompts.pad_multiple=1 (pad to the batch's longest)")
  _int(p, "synthetic_tasks", "config.prompts")
  _int(p, "tokenizer_vocab_size", "config.prompts", 0)
  if (not p.tokenizer and not config.get("hf_dir") and not config.get("init_from")
      and not p.tokenizer_vocab_size):
    raise ConfigError("config.prompts.tokenizer is empty, config.hf_dir is unset and "
                          "config.prompts.tokenizer_vocab_size=0 (do not train one): set "
                          "config.hf_dir (or config.prompts.tokenizer)")
  _int(config.warm_start, "steps", "config.warm_start", 0)
  _int(config.warm_start, "batch_size", "config.warm_start")
  _int(config.checkpoint, "interval", "config.checkpoint")
  _int(config.checkpoint, "keep", "config.checkpoint", 0)
  checkpoint.validate_section(config.checkpoint, error=ConfigError)

