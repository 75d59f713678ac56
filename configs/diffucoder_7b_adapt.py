"""Stage 1 of DiffuCoder: adapt an autoregressive Qwen2.5-Coder-7B into a diffusion model.

  python -m dcjax.main --config configs/diffucoder_7b_adapt.py --workdir gs://BUCKET/runs/adapt \\
      --config.hf_dir=/path/to/Qwen2.5-Coder-7B \\
      --config.data.tokenizer=/path/to/DiffuCoder-7B-Base \\
      --config.data.paths='/mnt/code/*.array_record'

Run on every host of a TPU pod slice (v4-64 / v5p-64 or larger; launch/gcp has the scripts).
The weights come from the AR checkpoint (`hf_dir`); the tokenizer must be DiffuCoder's (it
has <|mask|> = 151666, which Qwen2.5-Coder's lacks; the id is one of the checkpoint's spare
embedding rows). The masked-diffusion ELBO with attention-mask annealing turns causal into
bidirectional attention over the first `train.loss.anneal_steps` steps (docs/losses.md), 1% of rows
are cut to a random length, documents are packed into 4096-token rows. FSDP over all chips,
bf16 compute, fp32 AdamW state, remat per layer. Records are JSON {"text": ...} or raw text
in ArrayRecord files (tokenised on the fly on each host).

The paper trains 65B tokens in this stage; 256 x 4096 tokens per step gives ~62k steps.
Learning rate, warmup and annealing length are not given in the paper: the values here are
starting points, and this config has not been run at scale (no TPU in the development
environment). Logs every 10 steps: loss, masked-token accuracy, tokens/s, MFU (TPU data-sheet
peak); held-out ELBO every 1000 steps. The batch is accumulated over 4 micro-batches of 64
rows (two 4096-token rows per chip per micro-batch on 32 chips). While the attention mask is
annealed it is a dense pattern, so the attention runs blockwise (docs/attention.md). What the
compiled step needs per chip (BUILD.md, "Memory per chip"):
  python -m dcjax.main --config configs/diffucoder_7b_adapt.py --config.mode=compile \\
      --config.compile_topology=v5p-64
"""

from configs import diffucoder_7b
from dcjax.train.train_config import add_train_sections


def get_config():
  c = add_train_sections(diffucoder_7b.get_config())  # FSDP mesh, bf16 compute, remat
  c.train.update(dict(
      steps=62_000, batch_size=256, micro_batches=4, lr=1e-5, warmup_steps=500,
      end_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, log_every=10,
      eval_every=1_000, eval_batches=4, sample_prompt="def fibonacci(n):\n",
      sample_new_tokens=128, sample_steps=128))
  c.train.loss.update(dict(anneal_steps=10_000, truncate_prob=0.01, normaliser="token",
                           document_mask=False))
  c.data.update(dict(kind="pretrain", source="array_record", paths="", seq_len=4096,
                     eval_docs=512, shuffle_window=4096))
  c.checkpoint.update(dict(interval=500, keep=3, async_save=True))
  return c
