"""Coupled-GRPO on DiffuCoder-7B-Instruct with the paper's hyperparameters, for a TPU pod.

  python -m dcjax.main --config configs/grpo_diffucoder_7b.py --workdir gs://BUCKET/runs/cpgrpo \\
      --config.hf_dir=/path/to/DiffuCoder-7B-Instruct \\
      --config.prompts.path=/path/to/acecode_hard.jsonl

After this repo's SFT stage (configs/diffucoder_7b_sft.py), replace hf_dir with
--config.init_from=gs://BUCKET/runs/sft.

Run it on every host of the slice (launch/ scripts). Weights load straight into their FSDP
layout; the policy, the AdamW moments and the reference (fp32) take about 120 GB, i.e. about
7.5 GB per chip on 16 chips (v4-32 / v5p-32) before activations (rematerialised per layer).
Per rollout batch: 8 AceCode prompts x G = 10 completions (256 tokens, 256 entropy-ordered
steps, temperature 1.2, top-p 0.95), rewards 2.0 code + 0.5 format (asserts run in each host's
sandbox for its own rows), mu = 2 policy iterations (optimiser steps) with the coupled
estimator (lambda = 1, t ~ U(0.2, 0.8)), PPO clip 0.5, k3 KL beta = 0.01 to a reference
hard-copied every 64 optimiser steps, AdamW lr 1e-6, betas (0.9, 0.99), weight decay 0.1,
cosine to 10%, grad clip 0.2. 2,600 rollout batches is one pass over the ~21K-item hard
subset. The rollout batch (80) must divide evenly over the data x fsdp chips: on 32 chips
use --config.rl.num_prompts=16. Ablations: --config.rl.estimator=decoupled|full,
--config.rl.advantage=loo, --config.rl.ref_update=soft, --config.sampler.temperature=1.0;
the release's batch-dependent scoring: --config.rl.logp_attention_mask=False
--config.prompts.pad_multiple=1 (docs/grpo.md).
Expect the mean reward to rise over the first few hundred iterations and EvalPlus to move
from the Instruct model's 63.6 toward the cpGRPO model's 67.9 (docs/evaluation.md).
"""

from configs import diffucoder_7b
from dcjax.config import base_config
from dcjax.rl.grpo_config import add_grpo_sections


def get_config():
  c = add_grpo_sections(base_config())
  c.hf_dir = ""  # set --config.hf_dir=/path/to/DiffuCoder-7B-Instruct
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  # DiffuCoder-7B's architecture (what mode=compile builds; a run reads hf_dir's config.json)
  # and the runtime fields applied on top of the checkpoint's config.json.
  c.model = diffucoder_7b.get_config().model
  c.model.update(dict(dtype="bfloat16", param_dtype="float32", remat_policy="full",
                      attention_impl="splash", logits_chunk=256))
  c.rl.update(dict(
      steps=2600, num_prompts=8, num_generations=10, num_iterations=2, micro_batches=1,
      epsilon_low=0.5, epsilon_high=0.5, beta=0.01, advantage="mean", scale_rewards=False,
      estimator="coupled", num_pairs=1, t_min=0.2, t_max=0.8, ref_update_every=64,
      ref_update="hard", log_every=10, log_completions=1, reward_timeout_s=5.0))
  c.optim.update(dict(lr=1e-6, b1=0.9, b2=0.99, weight_decay=0.1, warmup_steps=0,
                      end_lr_ratio=0.1, grad_clip=0.2))
  c.sampler.update(dict(max_new_tokens=256, steps=256, alg="entropy", temperature=1.2,
                        top_p=0.95))
  c.prompts.update(dict(source="jsonl", path="", question_field="question",
                        tests_field="test_cases", max_prompt_len=200, pad_multiple=32,
                        tokenizer_vocab_size=0))  # the checkpoint's tokenizer only
  c.checkpoint.update(dict(interval=100, keep=3, async_save=True))
  return c
