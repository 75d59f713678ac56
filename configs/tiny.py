"""Tiny Dream-architecture model on the host CPU: the default that runs in seconds.

  python -m dcjax.main --config configs/tiny.py --workdir runs/tiny

Builds a 2-layer model on a CPU mesh, initialises it sharded, prints the parameter count,
each parameter's sharding, and runs a forward pass. Override any field on the command line,
e.g. `--config.model.num_layers=4 --config.mesh.fsdp=2`.
"""

from dcjax.config import base_config


def get_config():
  c = base_config()
  c.mode = "inspect"
  c.model.update(dict(
      vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=32, rope_theta=10_000.0, rms_norm_eps=1e-6,
      max_position_embeddings=1024, dtype="float32", param_dtype="float32",
      mask_token_id=4, pad_token_id=1, bos_token_id=None, eos_token_id=1))
  c.inspect_batch = 2
  c.inspect_length = 64
  return c
