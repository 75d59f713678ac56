"""Coupled-GRPO on the host CPU: a tiny model learns generated one-line function tasks.

  python -m dcjax.main --config configs/grpo_tiny.py --workdir runs/grpo_tiny

No download. Generates 96 synthetic tasks ("Write a Python function add_3(x) that returns x
plus 3." with two asserts each; dcjax.rl.synthetic), trains a 512-piece sentencepiece
tokenizer on them (cached in the workdir), builds a 2-layer random model and gives it a
150-step masked-diffusion SFT warm start on the reference solutions (a random model never
writes a ```python block, so every reward would be 0), then runs 30 coupled-GRPO iterations:
8 prompts x 8 completions each (32 new tokens, 32 sampler steps, entropy order, temperature
1.2, top-p 0.95), rewards 2.0 code + 0.5 format through the sandbox, mu = 2 policy
iterations, beta = 0.01, reference hard-copied every 16 optimiser steps, AdamW lr 5e-4 with
10 warmup steps. One log line per iteration
(reward total and per component, zero-variance groups, completion length, clip fraction,
KL, entropy, AR-ness, time split) and one sample completion; metrics in
runs/grpo_tiny/metrics.jsonl, checkpoints in runs/grpo_tiny/checkpoints/ (a rerun resumes).
The weak warm start mostly writes the fence right but the code often does not parse (format
0.5) or the block is malformed (0); RL raises the format reward. Expect the mean reward
(first / last 5 iterations) to go from about 0.14 to about 0.21 (format about 0.25 -> 0.4; the
code reward stays near 0 at this size), in about 9 minutes on 2 busy CPU cores (1 min SFT,
~12 s per iteration). Other task files work the same way (the tokenizer is then trained
on them), e.g. the MBPP train split (expect rewards near 0 for a model this small):
  --config.prompts.source=mbpp --config.prompts.path=../shared/data/mbpp.jsonl \\
  --config.prompts.max_prompt_len=200 --config.sampler.max_new_tokens=128
Ablations: --config.rl.estimator=decoupled|full, --config.rl.advantage=loo.
"""

from dcjax.config import base_config
from dcjax.rl.grpo_config import add_grpo_sections


def get_config():
  c = add_grpo_sections(base_config())
  c.model.update(dict(
      vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, rope_theta=10_000.0, max_position_embeddings=512,
      dtype="float32", param_dtype="float32", mask_token_id=4, pad_token_id=1,
      eos_token_id=1, scan_layers=False,  # a loop over two layers beats a scan on CPU
      logits_chunk=128))  # the head in chunks when remat is on (docs/attention.md)
  c.rl.update(dict(
      steps=30, num_prompts=8, num_generations=8, num_iterations=2, beta=0.01,
      ref_update_every=16, log_every=1, log_completions=1, reward_timeout_s=5.0,
      # Rollouts hide left padding; score the same way (prompt lengths vary by ~25% here).
      logp_attention_mask=True))
  # A tiny model needs a far larger step than the 7B recipe's 1e-6; warm up so Adam's
  # first sign-like steps do not knock the warm-started policy over.
  c.optim.update(dict(lr=5e-4, warmup_steps=10, grad_clip=1.0))
  c.sampler.update(dict(max_new_tokens=32, steps=32))
  c.prompts.update(dict(source="synthetic", synthetic_tasks=96, max_prompt_len=64,
                        pad_multiple=16, tokenizer_vocab_size=512))
  c.warm_start.update(dict(steps=150, batch_size=32, lr=3e-3, log_every=50))
  c.checkpoint.update(dict(interval=20, keep=2))
  return c
