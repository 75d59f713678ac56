"""Variance of the completion log-likelihood estimate across mask draws, and one RL step's time.

  python benchmarks/logp_variance.py [--draws 64] [--sequences 32] [--sft-steps 150]

1. A tiny model gets a short masked-diffusion SFT on the synthetic function tasks (so its
   predictions depend on context), then for each task's [prompt, reference answer] sequence
   the per-sequence estimate sum_n logp_n over the valid completion tokens is drawn with
   `--draws` independent mask keys, at equal forward passes (3 per draw):
     coupled    full-mask pass + one complementary pair (docs/grpo.md)
     decoupled  full-mask pass + two independent masks (same 1/t weights)
     full       the full-mask pass alone (d1), deterministic: variance 0, but biased
   Reported: the mean over sequences of each estimator's variance across draws, the ratio
   decoupled / coupled (the paper's claim: > 1), each estimator's mean, and coupled with
   lambda = 2 (5 passes) for scale.
2. One coupled-GRPO iteration on that model (4 prompts x 8 completions, 32 tokens,
   16 steps, rewards through the sandbox), after a warm-up iteration that compiles: the
   time split rollout / old+ref scoring / rewards (and the part of them not hidden behind
   device work) / updates. The tiny model's code rarely parses, so its own rewards run
   almost no asserts; a second run scores every row as its task's reference answer (64
   assert programs per iteration) to show the sandbox's cost and how much of it overlaps.

Ends with one line of JSON holding the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dcjax.config import base_config  # noqa: E402
from dcjax.model import ModelConfig  # noqa: E402
from dcjax import model as model_lib  # noqa: E402
from dcjax.rl import grpo_config, iteration, learner as learner_lib, logprobs, synthetic  # noqa: E402
from dcjax.train import optim  # noqa: E402
from dcjax.rl import warm_start as warm_lib  # noqa: E402
from dcjax.rl.loss import PolicyLossConfig  # noqa: E402
from dcjax.rl import rewards as rewards_lib  # noqa: E402
from dcjax.rl.reward_worker import RewardResult, RewardWorker, TextReward  # noqa: E402
from dcjax.rl.rollout import completion_mask  # noqa: E402
from dcjax.data.tokenizer import train_sentencepiece  # noqa: E402
from dcjax.rl import prompts as prompts_lib  # noqa: E402

NUM_NEW = 32


def tiny_setup(num_tasks: int, sft_steps: int, workdir: str):
  tasks = synthetic.synthetic_tasks(num_tasks, seed=0)
  texts = []
  for t in tasks:
    texts += [prompts_lib.build_question(t["question"], t["tests"]),
              prompts_lib.fenced_answer(t["solution"])]
  tok = train_sentencepiece(texts + ["system", "user", "assistant"], 512,
                            os.path.join(workdir, "sp512.model"))
  cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
                    mask_token_id=tok.mask_id, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
  params = model_lib.init_params(cfg, jax.random.key(0))
  params = warm_lib.warm_start(cfg, params, tasks, tok, steps=sft_steps, batch_size=32, lr=3e-3,
                               max_prompt_len=64, num_new=NUM_NEW, system_prompt=None, seed=0,
                               log=lambda m: print(m, file=sys.stderr), log_every=50)
  return tasks, tok, cfg, params


def variance_study(cfg, params, tok, tasks, sequences: int, draws: int) -> dict:
  ids, mask, comp = warm_lib.sft_rows(tasks[:sequences], tok, max_prompt_len=64,
                                      num_new=NUM_NEW, system_prompt=None)
  tokens = jnp.asarray(np.concatenate([ids, comp], axis=1))
  valid = completion_mask(jnp.asarray(comp), tok.chat_end_id).astype(jnp.float32)
  b = tokens.shape[0]

  def estimator(ecfg):
    @jax.jit
    def draws_fn(keys):
      def one(key):
        noise = logprobs.draw_noise(key, b, NUM_NEW, ecfg)
        logp, _ = logprobs.per_token_logps(cfg, params, tokens, noise, ecfg, tok.mask_id)
        return jnp.sum(logp * valid, axis=1)
      return jax.lax.map(one, keys)
    return draws_fn

  keys = jax.random.split(jax.random.key(42), draws)
  out = {}
  for name, ecfg in (("coupled", logprobs.EstimatorConfig("coupled")),
                     ("decoupled", logprobs.EstimatorConfig("decoupled")),
                     ("full", logprobs.EstimatorConfig("full")),
                     ("coupled_lambda2", logprobs.EstimatorConfig("coupled", num_pairs=2))):
    start = time.perf_counter()
    est_DxS = np.asarray(estimator(ecfg)(keys), np.float64)
    out[name] = dict(var=float(est_DxS.var(axis=0, ddof=1).mean()),
                     mean=float(est_DxS.mean()), passes=ecfg.num_passes,
                     seconds=time.perf_counter() - start)
  return out


class ReferenceAnswerReward(TextReward):
  """Scores every row as if it were its task's reference answer: the sandbox runs all the
  asserts (what a policy that mostly parses costs), while the rollout stays real."""

  def __call__(self, rollout, tasks):
    texts = [prompts_lib.fenced_answer(tasks[i]["solution"]) for i in rollout.prompt_index_B]
    tests = [tasks[i]["tests"] for i in rollout.prompt_index_B]
    b = rewards_lib.compute_rewards(texts, tests, self.weights, sandbox=self.sandbox)
    return RewardResult(total=b.total, per_name=b.per_name, texts=texts)


def rl_step_split(cfg, params, tok, tasks, reward_cls=TextReward) -> dict:
  section = grpo_config.add_grpo_sections(base_config()).optim
  section.update(lr=3e-4, grad_clip=1.0)
  tx, schedule = optim.make_optimizer(section, 100)
  lcfg = learner_lib.LearnerConfig(loss=PolicyLossConfig(0.5, 0.5, 0.01))
  lrn = learner_lib.Learner(cfg, lcfg, tx, schedule, mask_id=tok.mask_id)
  state = lrn.init_state(params, seed=0)
  icfg = iteration.IterationConfig(
      group_size=8, num_iterations=2, ref_update_every=64, end_id=tok.chat_end_id,
      sampler_kwargs=dict(max_new_tokens=NUM_NEW, steps=16, alg="entropy", temperature=1.2,
                          top_p=0.95))
  reward = reward_cls(tok)
  picked = tasks[:4]
  rows = [prompts_lib.encode_prompt(tok, prompts_lib.prompt_text(tok, t, None), 64)
          for t in picked]
  p = max(len(r) for r in rows)
  ids = np.full((4, p), tok.pad_id, np.int32)
  mask = np.zeros((4, p), bool)
  for i, r in enumerate(rows):
    ids[i, p - len(r):], mask[i, p - len(r):] = r, True
  with RewardWorker() as worker:
    timings = []
    for i in range(3):  # the first compiles
      state, m, _ = iteration.grpo_iteration(lrn, state, ids, mask, picked, reward,
                                             jax.random.key(i), icfg, worker)
      timings.append(m)
  keys = ("rollout_s", "score_s", "reward_s", "reward_wait_s", "update_s", "step_s")
  split = {k: float(np.mean([t[k] for t in timings[1:]])) for k in keys}
  split["rollout_share"] = split["rollout_s"] / split["step_s"]
  split["scoring_and_update_share"] = (split["score_s"] + split["update_s"]) / split["step_s"]
  split["reward_exposed_share"] = split["reward_wait_s"] / split["step_s"]
  split["reward_hidden_fraction"] = 1.0 - split["reward_wait_s"] / max(split["reward_s"], 1e-9)
  split["reward"] = float(np.mean([t["reward"] for t in timings[1:]]))
  return split


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--draws", type=int, default=64)
  parser.add_argument("--sequences", type=int, default=32)
  parser.add_argument("--sft-steps", type=int, default=150)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    tasks, tok, cfg, params = tiny_setup(96, args.sft_steps, workdir)
  var = variance_study(cfg, params, tok, tasks, args.sequences, args.draws)
  ratio = var["decoupled"]["var"] / var["coupled"]["var"]
  print(f"per-sequence variance of sum_n logp_n over {args.draws} mask draws, mean over "
        f"{args.sequences} sequences (3 forward passes each):")
  for name, v in var.items():
    print(f"  {name:<16} var {v['var']:10.4f}  mean {v['mean']:9.3f}  passes {v['passes']}")
  print(f"  decoupled / coupled variance ratio: {ratio:.2f}")
  split = rl_step_split(cfg, params, tok, tasks)
  heavy = rl_step_split(cfg, params, tok, tasks, ReferenceAnswerReward)
  for label, sp in (("own completions", split), ("reference answers, all asserts run", heavy)):
    print(f"one RL iteration (4 prompts x 8, 32 tokens, mu=2; rewards of {label}): "
          f"{sp['step_s']:.2f}s = rollout {sp['rollout_s']:.2f}s + old/ref scoring "
          f"{sp['score_s']:.2f}s + reward wait {sp['reward_wait_s']:.2f}s (rewards took "
          f"{sp['reward_s']:.2f}s on the worker, {100 * sp['reward_hidden_fraction']:.0f}% "
          f"hidden) + updates {sp['update_s']:.2f}s; mean reward {sp['reward']:.2f}")
  record = dict(benchmark="logp_variance", device=jax.devices()[0].device_kind,
                draws=args.draws, sequences=args.sequences,
                var_coupled=var["coupled"]["var"], var_decoupled=var["decoupled"]["var"],
                var_full=var["full"]["var"], var_coupled_lambda2=var["coupled_lambda2"]["var"],
                ratio_decoupled_over_coupled=ratio,
                mean_coupled=var["coupled"]["mean"], mean_decoupled=var["decoupled"]["mean"],
                mean_full=var["full"]["mean"], rl_step=split, rl_step_all_asserts=heavy)
  print(json.dumps(record))


if __name__ == "__main__":
  main()
