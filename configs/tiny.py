"""Tiny Dream-architecture model pretrained with the masked-diffusion loss on the host CPU.

  python -m dcjax.main --config configs/tiny.py --workdir runs/tiny

The default job, no download: trains a 2048-piece sentencepiece tokenizer on this Python's
standard library (cached in runs/tiny/tokenizer/), pretrains a 2-layer, 0.9M-parameter
bidirectional model with the masked-diffusion ELBO on the stdlib sources packed into
128-token rows (64 files held out), prints the compiled step's memory analysis, a progress
bar and a log line every 25 steps (loss, masked-token CE and accuracy, grad norm, lr,
tokens/s, MFU against a matmul peak measured in the same process), the held-out loss / ELBO
every 100 steps, checkpoints to runs/tiny/checkpoints/, then a sample completion of a Python
prompt from the sampler (dcjax.diffusion.sampler, entropy order, greedy).
Expect the held-out loss to fall from ~16.4 to ~11.8 (masked-token CE 7.6 -> 5.6) over 300
steps, and the whole job to take about 3-3.5 minutes on 2 CPU cores. At this size and budget
the sample is mostly indentation and `self.`; the point is the pipeline end to end.
Metrics: runs/tiny/metrics.jsonl and runs/tiny/tensorboard/. Rerunning with the same workdir
resumes from the last checkpoint (a finished run just samples again; use a new workdir, or
--config.train.steps=N --config.allow_config_change=True to train longer: docs/runs.md).
A checkpoint whose files fail their fingerprint check is reported in one line, moved to
checkpoints/<step>.corrupt, and the previous one restored (`--config.checkpoint.verify=fatal`
stops instead).
Override any field, e.g. `--config.train.steps=100 --config.train.micro_batches=2`.
"""

from dcjax.config import base_config
from dcjax.train.train_config import add_train_sections


def get_config():
  c = add_train_sections(base_config())
  c.model.update(dict(
      vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=32, rope_theta=10_000.0, rms_norm_eps=1e-6,
      max_position_embeddings=1024, dtype="float32", param_dtype="float32",
      mask_token_id=4, pad_token_id=1, bos_token_id=None, eos_token_id=1,
      scan_layers=False,  # two layers: a loop is faster than a scan on CPU (docs/model.md)
      logits_chunk=128))  # the head in chunks when remat is on (docs/attention.md)
  c.train.update(dict(
      steps=300, batch_size=16, lr=2e-3, warmup_steps=30, end_lr_ratio=0.1, weight_decay=0.01,
      b2=0.98, log_every=25, eval_every=100, eval_batches=4,
      sample_prompt="def read_lines(path):\n", sample_new_tokens=48, sample_steps=48))
  c.data.update(dict(seq_len=128, eval_docs=64, tokenizer_vocab_size=2048,
                     tokenizer_train_chars=3_000_000))
  c.checkpoint.update(dict(interval=100, keep=2))
  return c
