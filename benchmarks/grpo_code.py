"""Coupled-GRPO on generated code tasks: held-out execution pass rates before and after RL, and
the paper's estimator ablation (coupled / decoupled / full-mask) at CPU scale.

  python benchmarks/grpo_code.py [--quick] [--seeds 3] [--iterations 16] [--slip_rate 0.6] \\
      [--png docs/img/grpo_code.png]

1. `dcjax.rl.code_tasks`: 12 templates (arithmetic, conditionals, string and list transforms)
   x constants; held-out (template, constant) pairs never seen in training.
2. A 2-layer model (hidden 64) gets a masked-diffusion SFT warm start on demonstrations of
   half of the training pairs by a careless teacher: each is the template's slip (one
   operator or operand order off) with probability `--slip_rate` (0.6), else the reference.
3. From that checkpoint, coupled-GRPO with each estimator (`rl.estimator`), `--seeds` seeds
   each, the same iterations, prompts per iteration, group size and optimiser: rewards
   2.0 x code + 0.5 x format through the sandbox, prompts from every training pair.
4. Held-out evaluation before and after (and every `eval_every` iterations): greedy pass@1
   through `dcjax.eval.evaluate` (every assert of a task in one sandboxed program) and the
   mean code reward of sampled completions (the RL reward path).
5. The per-token variance of each estimator across mask draws at the SFT checkpoint, and the
   wall time of each run's RL iterations.

Prints a table, writes the curves (training reward, held-out pass@1) to `--png`, and ends
with one line of JSON. `--quick`: one seed. docs/grpo.md, "Code-execution study".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcjax import host_malloc  # noqa: E402
host_malloc.tune()  # as python -m dcjax.main does (docs/performance.md, "Host memory")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dcjax.rl import code_study  # noqa: E402

KINDS = ("coupled", "decoupled", "full")
SFT_EVAL_KEYS = 3  # sampled SFT evaluations with different keys: the sampling noise


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def plot(path: str, results: dict, sft: dict, cfg: code_study.StudyConfig) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(10, 3.8))
  colors = dict(coupled="tab:blue", decoupled="tab:orange", full="tab:green")
  for kind, runs in results.items():
    its = np.asarray(runs[0]["curve"]["iteration"])
    code = np.stack([r["curve"]["code"] for r in runs])
    # 2.0 x code reward on the training prompts, smoothed over 3 iterations
    kernel = np.ones(3) / 3
    smooth = np.convolve(code.mean(axis=0), kernel, mode="valid")
    ax_r.plot(its[1:-1], smooth, color=colors[kind], label=kind)
    e_its = np.asarray(runs[0]["curve"]["eval_iteration"])
    p = np.stack([[sft["pass1"]] + r["curve"]["heldout_pass1"][1:] for r in runs])
    ax_p.errorbar(e_its, p.mean(axis=0), yerr=p.std(axis=0), color=colors[kind], capsize=3,
                  marker="o", label=kind)
  ax_p.axhline(sft["pass1"], color="gray", ls="--", label="SFT")
  ax_r.set(xlabel="GRPO iteration", ylabel="code reward (train prompts, 3-it. mean)",
           title=f"training reward ({cfg.num_prompts} prompts x {cfg.group_size})")
  ax_p.set(xlabel="GRPO iteration", ylabel="held-out greedy pass@1",
           title="held-out pass@1 (mean ± std over seeds)")
  for ax in (ax_r, ax_p):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="one seed per estimator")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--iterations", type=int, default=code_study.StudyConfig.iterations)
  parser.add_argument("--slip_rate", type=float, default=code_study.StudyConfig.slip_rate,
                      help="share of the warm start's demonstrations that carry the slip "
                           "(0: a clean teacher)")
  parser.add_argument("--png", default="docs/img/grpo_code.png")
  args = parser.parse_args()
  seeds = range(1 if args.quick else args.seeds)
  cfg = code_study.StudyConfig(iterations=args.iterations, slip_rate=args.slip_rate)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    study = code_study.setup(cfg, workdir, log=log)
  sft_evals = [code_study.heldout_eval(study, study.sft_params, jax.random.key(10_000 + s))
               for s in range(SFT_EVAL_KEYS)]
  sft = dict(pass1=sft_evals[0]["pass1"], code=float(np.mean([e["code"] for e in sft_evals])),
             code_std=mean_std([e["code"] for e in sft_evals])[1],
             format=float(np.mean([e["format"] for e in sft_evals])))
  log(f"SFT ({cfg.sft_steps} steps, {study.sft_s:.0f}s): held-out pass@1 {sft['pass1']:.3f}, "
      f"sampled code reward {sft['code']:.3f} ± {sft['code_std']:.3f}")
  variance = {k: code_study.estimator_variance(study, study.sft_params, k) for k in KINDS}

  results = {}
  for kind in KINDS:
    learner = code_study.make_learner(study, kind)
    results[kind] = []
    for seed in seeds:
      run = code_study.rl_run(study, learner, seed, log=log)
      run.pop("params")
      results[kind].append(run)
      log(f"{kind} seed {seed}: held-out pass@1 {run['final']['pass1']:.3f}, sampled code "
          f"{run['final']['code']:.3f}, RL {run['rl_s']:.0f}s")
  total_s = time.perf_counter() - start

  summary = {}
  print(f"\nheld-out: {len(study.splits.heldout)} tasks (unseen template x constant pairs); "
        f"{cfg.iterations} GRPO iterations x {cfg.num_prompts} prompts x {cfg.group_size}, "
        f"{len(seeds)} seed(s)")
  print("| policy | held-out pass@1 (greedy) | held-out code reward (sampled) | "
        "per-token estimator variance | RL wall time per run |")
  print("|---|---|---|---|---|")
  print(f"| SFT warm start | {sft['pass1']:.3f} | {sft['code']:.3f} ± {sft['code_std']:.3f} "
        f"| | {study.sft_s:.0f} s (SFT) |")
  for kind, runs in results.items():
    p_mean, p_std = mean_std([r["final"]["pass1"] for r in runs])
    c_mean, c_std = mean_std([r["final"]["code"] for r in runs])
    wall = float(np.mean([r["rl_s"] for r in runs]))
    summary[kind] = dict(heldout_pass1_mean=p_mean, std=p_std, heldout_code_mean=c_mean,
                         heldout_code_std=c_std, variance=variance[kind], wall_s=wall,
                         pass1_per_seed=[r["final"]["pass1"] for r in runs])
    print(f"| GRPO, {kind} | {p_mean:.3f} ± {p_std:.3f} | {c_mean:.3f} ± {c_std:.3f} | "
          f"{variance[kind]:.4f} | {wall:.0f} s |")
  print(f"total wall time {total_s:.0f}s")
  if args.png:
    plot(args.png, results, sft, cfg)
  record = dict(benchmark="grpo_code", device=jax.devices()[0].device_kind,
                seeds=len(seeds), iterations=cfg.iterations,
                heldout_tasks=len(study.splits.heldout), sft_heldout_pass1=sft["pass1"],
                sft_heldout_code=sft["code"], sft_heldout_code_std=sft["code_std"],
                **summary, config=dataclasses.asdict(cfg), total_s=total_s)
  print(json.dumps(record))


if __name__ == "__main__":
  main()
