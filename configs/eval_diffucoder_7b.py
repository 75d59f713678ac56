"""HumanEval (or MBPP / EvalPlus) of DiffuCoder-7B on a TPU slice (v5p-8, or v5litepod-8 /
v6e-8): configs/eval_humaneval.py with bf16 weights sharded over every chip (FSDP) and 32
completions sampled per compiled call.

  python -m dcjax.main --config configs/eval_diffucoder_7b.py --workdir runs/eval7b \\
      --config.hf_dir=/path/to/DiffuCoder-7B-Instruct

After this repo's coupled-GRPO stage (configs/grpo_diffucoder_7b.py), evaluate its workdir
directly: replace hf_dir with --config.checkpoint_dir=gs://BUCKET/runs/cpgrpo; or export it
first (--config.mode=export, docs/checkpoints.md).

What the compiled sampler needs per chip (BUILD.md, "Memory per chip"):
  python -m dcjax.main --config configs/eval_diffucoder_7b.py --config.mode=compile \\
      --config.compile_topology=v5p-8
"""

from configs import diffucoder_7b
from configs import eval_humaneval


def get_config():
  c = diffucoder_7b.serving(eval_humaneval.get_config())
  c.eval.batch_size = 32
  return c
