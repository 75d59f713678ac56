"""Stage 3 of DiffuCoder: instruction tuning (masked-diffusion SFT) of DiffuCoder-7B-Base.

  python -m dcjax.main --config configs/diffucoder_7b_sft.py --workdir gs://BUCKET/runs/sft \\
      --config.hf_dir=/path/to/DiffuCoder-7B-Base \\
      --config.data.paths='/mnt/sft/*.jsonl.gz'

After this repo's adaptation stage (configs/diffucoder_7b_adapt.py), start from its workdir
instead of a Hugging Face directory: replace hf_dir with
--config.init_from=gs://BUCKET/runs/adapt (the newest checkpoint; `:STEP` picks one).

Run on every host of a TPU pod slice. Records are chat samples {"messages": [{"role",
"content"}, ..., {"role": "assistant", ...}]} or {"prompt", "response"}; each becomes
ChatML prompt + response + <|im_end|>, padded with <|dlm_pad|> to 2048 tokens (docs/losses.md): the
prompt is never masked, the response and the pads are masked with probability t and are the
targets, so the model learns where to stop. Samples whose prompt alone is longer are
dropped. The paper tunes on 436K samples; 256 per step gives ~1.7k steps per epoch. Learning
rate and epochs are not given in the paper: the values here are starting points, and this
config has not been run at scale here. The masked-token accuracy on held-out samples rises
quickly at first (pad targets are easy); evaluate the result with configs/eval_humaneval.py.
"""

from configs import diffucoder_7b
from dcjax.train.train_config import add_train_sections


def get_config():
  c = add_train_sections(diffucoder_7b.get_config())  # FSDP mesh, bf16 compute, remat
  c.train.update(dict(
      steps=5_000, batch_size=256, micro_batches=2, lr=1e-5, warmup_steps=100,
      end_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=1.0, log_every=10,
      eval_every=500, eval_batches=4, sample_prompt="def fibonacci(n):\n",
      sample_new_tokens=128, sample_steps=128))
  c.train.loss.update(dict(anneal_steps=0, truncate_prob=0.0, normaliser="token"))
  c.data.update(dict(kind="sft", source="jsonl", paths="", seq_len=2048, eval_docs=512,
                     sft_pad="dlm_pad"))
  c.checkpoint.update(dict(interval=500, keep=3, async_save=True))
  return c
