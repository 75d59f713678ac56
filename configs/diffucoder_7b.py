"""DiffuCoder-7B (Qwen2.5-Coder-7B layout, bidirectional, docs/model.md), for TPU pods.

  python -m dcjax.main --config configs/diffucoder_7b.py --workdir gs://BUCKET/runs/dc7b \\
      --config.hf_dir=/path/to/DiffuCoder-7B-Base

With `hf_dir` set the architecture is read from the checkpoint's config.json and the
weights are loaded straight into their sharded layout; without it the model is
initialised from scratch (7.6B parameters). FSDP over all chips by default; the Pallas splash
attention kernel (blockwise where a mask needs it) and the LM head applied 1024 positions at a
time keep no [L, L] scores and no [L, vocab] fp32 logits for the whole row (docs/attention.md).
"""

from dcjax.config import base_config


def get_config():
  c = base_config()
  c.mode = "inspect"
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.model.update(dict(
      vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
      num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
      max_position_embeddings=131072, dtype="bfloat16", param_dtype="float32",
      remat_policy="dots_no_batch", attention_impl="splash", logits_chunk=1024,
      mask_token_id=151666, pad_token_id=151643,
      bos_token_id=151643, eos_token_id=151643))
  c.inspect_batch = 8
  c.inspect_length = 2048
  return c


def serving(c):
  """Puts DiffuCoder-7B in bf16 weights, FSDP over every chip, into a sample / eval config
  (a run with hf_dir reads the architecture from its config.json instead)."""
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.model = get_config().model
  c.model.update(dict(dtype="bfloat16", param_dtype="bfloat16"))
  return c
