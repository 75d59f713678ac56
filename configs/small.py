"""~100M-parameter Dream-architecture model: a single accelerator or a small slice.

  python -m dcjax.main --config configs/small.py --workdir runs/small

16k vocabulary, 12 layers of width 768 with GQA (12 query / 4 key-value heads).
"""

from dcjax.config import base_config


def get_config():
  c = base_config()
  c.mode = "inspect"
  c.model.update(dict(
      vocab_size=16384, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
      num_kv_heads=4, head_dim=64, rope_theta=10_000.0, rms_norm_eps=1e-6,
      max_position_embeddings=2048, dtype="bfloat16", param_dtype="float32",
      remat_policy="none", mask_token_id=4, pad_token_id=1, eos_token_id=1,
      scan_layers=False,  # a layer loop: 5 % faster train step on CPU (docs/model.md)
      logits_chunk=128))  # the head in chunks when remat is on (docs/attention.md)
  c.inspect_batch = 8
  c.inspect_length = 512
  return c
