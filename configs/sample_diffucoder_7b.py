"""Sample DiffuCoder-7B-Instruct on a TPU slice (v5p-8, or v5litepod-8 / v6e-8): bf16 weights
sharded over every chip (FSDP), DiffuCoder's evaluation decoding settings.

  python -m dcjax.main --config configs/sample_diffucoder_7b.py --workdir runs/sample7b \\
      --config.hf_dir=/path/to/DiffuCoder-7B-Instruct \\
      --config.prompt='Write a Python function that checks whether a number is prime.'

The weights take 15.2 GB in bf16, more than one 16 GiB v5e chip holds beside the canvas; what
the compiled sampler needs per chip (BUILD.md, "Memory per chip"):
  python -m dcjax.main --config configs/sample_diffucoder_7b.py --config.mode=compile \\
      --config.compile_topology=v5p-8
"""

from configs import diffucoder_7b
from configs import sample


def get_config():
  c = diffucoder_7b.serving(sample.get_config())
  c.num_samples = 4
  c.sampler.update(dict(max_new_tokens=256, steps=256, alg="entropy", temperature=0.3,
                        top_p=0.95))
  return c
