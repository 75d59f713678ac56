"""~100M-parameter model (configs/small.py) pretrained with the masked-diffusion loss.

  python -m dcjax.main --config configs/small_pretrain.py --workdir runs/small_pretrain

Sized for one accelerator (a GPU, or a TPU v4-8 / v5e-8 slice with data parallelism over its
chips): global batch 64 x 1024 tokens in bf16, AdamW 6e-4 with 1k warmup steps and cosine
decay over 20k steps (~1.3B tokens). By default it trains a 16k-piece sentencepiece tokenizer
on this Python's standard library and pretrains on it (many passes over ~11M tokens). The
held-out loss starts near 2 ln(16384) ~ 19.4 (the token-mean of CE/t at random init) and
should fall steadily; this config has not been run to completion here (no accelerator in
the development environment). For a real corpus point it at JSONL or ArrayRecord files of
{"text": ...} records, e.g.
  --config.data.source=array_record --config.data.paths='/data/code/*.array_record'
On a CPU this config is only for benchmarks (benchmarks/train_step.py); use configs/tiny.py.
"""

from configs import small
from dcjax.train.train_config import add_train_sections


def get_config():
  c = add_train_sections(small.get_config())
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  c.train.update(dict(
      steps=20_000, batch_size=64, micro_batches=1, lr=6e-4, warmup_steps=1_000,
      end_lr_ratio=0.1, weight_decay=0.1, b2=0.95, grad_clip=1.0, log_every=50,
      eval_every=1_000, eval_batches=8, sample_prompt="def read_lines(path):\n",
      sample_new_tokens=64, sample_steps=64))
  c.train.loss.update(dict(truncate_prob=0.01, anneal_steps=0))
  c.data.update(dict(seq_len=1024, eval_docs=64, tokenizer_vocab_size=16384,
                     tokenizer_train_chars=20_000_000, shuffle_window=2048))
  c.checkpoint.update(dict(interval=1_000, keep=3))
  return c
