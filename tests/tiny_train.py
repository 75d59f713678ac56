"""The one-layer train config that the loop tests share: seconds to compile."""

from dcjax.config import base_config
from dcjax.train.train_config import add_train_sections


def tiny_train_config(steps: int):
  """Model and train sections only; each test sets its data and checkpoint sections."""
  c = add_train_sections(base_config())
  c.model.update(dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=10_000.0,
                      mask_token_id=4, pad_token_id=1, eos_token_id=1))
  c.train.update(dict(steps=steps, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1,
                      eval_batches=0, sample_new_tokens=0))
  c.train.loss.truncate_prob = 0.0  # no attention mask: a smaller program to compile
  return c
