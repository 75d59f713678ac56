"""Sample completions with the parallel-unmasking sampler (Dream / DiffuCoder).

Without a checkpoint (random tiny model + byte-level tokenizer; runs in seconds on a CPU,
prints gibberish, and with --config.visualize writes the decoding-order pictures):

  python -m dcjax.main --config configs/sample.py --workdir runs/sample --config.visualize=True

A released checkpoint, DiffuCoder's evaluation settings (docs/sampler.md):

  python -m dcjax.main --config configs/sample.py --workdir runs/sample \\
      --config.hf_dir=/path/to/DiffuCoder-7B-Instruct \\
      --config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16 \\
      --config.prompt='Write a Python function that checks whether a number is prime.' \\
      --config.sampler.max_new_tokens=256 --config.sampler.steps=256 \\
      --config.sampler.temperature=0.3 --config.sampler.top_p=0.95 --config.sampler.alg=entropy

Fast-dLLM decoding on top: --config.sampler.block_length=32 --config.sampler.threshold=0.9
--config.sampler.cache=dual. LLaDA's options: --config.sampler.cfg_scale=1.0,
--config.sampler.alg=random, --config.sampler.logits_eos_inf=True,
--config.sampler.confidence_eos_eot_inf=True, --config.sampler.early_stop=True.

Infilling (docs/sampler.md): put `<|mask|>` tokens in the prompt, or fill `length` masks between
a prefix and a suffix after the (chat-wrapped) prompt; the canvas is then the text itself:

  --config.infill.prefix='def add(a, b):\n' --config.infill.length=16 \
  --config.infill.suffix='\n\nprint(add(1, 2))\n'

Prints each completion (cut at eos / <|im_end|> / pad; with infilling the whole filled text),
the number of steps and tokens/s, and writes completions.jsonl to the workdir.
"""

from ml_collections import config_dict

from dcjax.config import base_config
from dcjax.diffusion.sampler_config import sampler_section


def get_config():
  c = base_config()
  c.mode = "sample"
  c.hf_dir = ""  # empty: random model from c.model + byte-level tokenizer
  c.tokenizer_path = ""  # empty: hf_dir
  c.prompt = "Write a Python function that returns the n-th Fibonacci number."
  c.chat = True  # wrap the prompt in the ChatML template (Instruct models)
  c.assistant_prefix = ""  # prefill of the assistant turn
  c.num_samples = 1
  c.visualize = False
  c.mesh = config_dict.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.seed = 0
  c.sampler = sampler_section()
  c.infill = config_dict.ConfigDict({"prefix": "", "suffix": "", "length": 0})  # 0: off
  # The random fallback model: byte tokenizer ids (256 = <|endoftext|>, 259 = <|mask|>).
  c.model.update(dict(
      vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=32, rope_theta=10_000.0, rms_norm_eps=1e-6,
      max_position_embeddings=1024, dtype="float32", param_dtype="float32",
      mask_token_id=259, pad_token_id=256, bos_token_id=None, eos_token_id=256))
  return c
