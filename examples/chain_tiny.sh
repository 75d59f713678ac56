#!/usr/bin/env bash
# The training stages chained on a tiny model, on the host CPU (about 3 min on 2 cores):
#   pretrain (standing in for AR->diffusion adaptation: attention-mask annealing on)
#   -> SFT -> coupled-GRPO -> HumanEval eval -> Hugging Face export -> sampling the export.
# Each stage reads the previous stage's orbax workdir: config.init_from (train, grpo: params
# only, fresh optimiser, step 0, the model config and tokenizer of that run) or
# config.checkpoint_dir (sample, eval); nothing is exported between stages (docs/checkpoints.md).
#
#   bash examples/chain_tiny.sh [OUT]     # default OUT=runs/chain; STEPS_SCALE=0.1 shortens
set -euo pipefail
OUT=${1:-runs/chain}
PY=${PYTHON:-.venv/bin/python}
S=${STEPS_SCALE:-1}
n() { "$PY" -c "print(max(1, int($1 * $S)))"; }
dc() { echo "+ dcjax.main $*" >&2; "$PY" -m dcjax.main "$@"; }
mkdir -p "$OUT"
start=$(date +%s)

# 1. Pretraining with the masked-diffusion loss; the attention mask is annealed from causal
#    to bidirectional over the first half (as the AR->diffusion adaptation does).
P=$(n 200)
dc --config configs/tiny.py --workdir "$OUT/pretrain" --config.train.steps="$P" \
   --config.train.loss.anneal_steps=$(( P / 2 )) --config.train.eval_every="$P" \
   --config.checkpoint.interval="$P" --config.train.sample_new_tokens=0

# 2. SFT on generated one-line function tasks (prompt / fenced answer), from the pretrain run.
"$PY" - "$OUT/sft.jsonl" <<'PYEOF'
import json, sys
from dcjax.rl import prompts, synthetic
with open(sys.argv[1], "w") as f:
  for t in synthetic.synthetic_tasks(400, seed=1):
    f.write(json.dumps({"prompt": prompts.build_question(t["question"], t["tests"]),
                        "response": prompts.fenced_answer(t["solution"])}) + "\n")
PYEOF
F=$(n 150)
dc --config configs/tiny.py --workdir "$OUT/sft" --config.init_from="$OUT/pretrain" \
   --config.data.kind=sft --config.data.source=jsonl --config.data.paths="$OUT/sft.jsonl" \
   --config.data.eval_docs=32 --config.train.steps="$F" --config.train.lr=1e-3 \
   --config.train.warmup_steps=10 --config.train.eval_every="$F" \
   --config.checkpoint.interval="$F" --config.train.sample_new_tokens=0

# 3. Coupled-GRPO from the SFT run (its tokenizer; no warm start: SFT was the warm start).
dc --config configs/grpo_tiny.py --workdir "$OUT/grpo" --config.init_from="$OUT/sft" \
   --config.warm_start.steps=0 --config.rl.steps=$(n 6) --config.rl.num_prompts=4 \
   --config.rl.num_generations=4 --config.prompts.max_prompt_len=128 \
   --config.checkpoint.interval=$(n 6)

# 4. HumanEval pass@1 of the GRPO checkpoint (a model this small scores 0: the plumbing).
dc --config configs/eval_humaneval.py --workdir "$OUT/eval" --config.checkpoint_dir="$OUT/grpo" \
   --config.eval.limit=4 --config.eval.batch_size=4 --config.sampler.max_new_tokens=32 \
   --config.sampler.steps=32

# 5. Export the GRPO checkpoint as a Hugging Face directory, then sample from it.
dc --config configs/grpo_tiny.py --workdir "$OUT/grpo" --config.mode=export \
   --config.export_dir="$OUT/hf"
dc --config configs/sample.py --workdir "$OUT/sample" --config.hf_dir="$OUT/hf" \
   --config.sampler.max_new_tokens=32 --config.sampler.steps=32 --config.sampler.temperature=0.0
echo "chain done in $(( $(date +%s) - start ))s: $OUT/hf" >&2
