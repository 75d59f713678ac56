"""Coupled-GRPO on generated code tasks at CPU scale: warm start, RL runs, held-out evaluation.

The pieces of `benchmarks/grpo_code.py` and `tests/test_grpo_code.py` (docs/grpo.md,
"Code-execution study"):

  setup          the splits of `dcjax.rl.code_tasks`, a sentencepiece tokenizer trained on the
                 training split's text, a tiny model, SFT (warm_start.py) on a careless
                 teacher's demonstrations of the `sft` split (`code_tasks.teacher_demos`)
  heldout_eval   greedy pass@1 through the evaluation harness (`dcjax.eval.evaluate`: every
                 held-out task's asserts in one sandboxed program, as benchmarks are run) and
                 the sampled mean code / format reward through the RL reward path
  rl_run         coupled-GRPO iterations (`grpo_iteration`) from the warm start, prompts drawn
                 from the whole training split, rewards 2.0 code + 0.5 format in the sandbox
  estimator_variance   the per-token variance of each estimator across mask draws

Prompts are the RL prompts (chat template, "Test cases: " + first assert, no system turn);
the harness builds its own instruct prompt for a Task, so `harness_generate_fn` maps that
prompt back to the task's RL prompt, samples, and hands the harness the code of a
well-formatted answer (the text after "```python\\n", the harness's instruct prefill) or ""
when the format reward is not 1, so a pass needs the right format, as the code reward does.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dcjax import model as model_lib
from dcjax.config import base_config
from dcjax.data.tokenizer import train_sentencepiece
from dcjax.eval import Task, build_prompt, evaluate
from dcjax.eval.tasks import mbpp_prompt
from dcjax.model import ModelConfig
from dcjax.rl import code_tasks, grpo_config, iteration, logprobs
from dcjax.rl import learner as learner_lib
from dcjax.rl import prompts as prompts_lib
from dcjax.rl import rewards as rewards_lib
from dcjax.rl import rollout as rollout_lib
from dcjax.rl import warm_start as warm_lib
from dcjax.rl.loss import PolicyLossConfig
from dcjax.rl.reward_worker import RewardWorker, TextReward, decode_completions
from dcjax.train import optim


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything a study run needs; the defaults are the benchmark's."""

  split_seed: int = 0
  sft_fraction: float = 0.5
  slip_rate: float = 0.6
  demo_copies: int = 4
  vocab_size: int = 512
  hidden_size: int = 64
  num_layers: int = 2
  max_prompt_len: int = 96
  num_new: int = 32
  sampler_steps: int = 16
  temperature: float = 1.0
  top_p: float = 0.95
  sft_steps: int = 1200
  sft_batch: int = 32
  sft_lr: float = 3e-3
  iterations: int = 16
  num_prompts: int = 8
  group_size: int = 8
  mu: int = 1
  lr: float = 5e-4
  warmup_steps: int = 4
  beta: float = 0.01
  ref_update_every: int = 16
  eval_every: int = 8
  eval_samples: int = 4

  def sampler(self, temperature: float | None = None) -> dict:
    t = self.temperature if temperature is None else temperature
    return dict(max_new_tokens=self.num_new, steps=self.sampler_steps, alg="entropy",
                temperature=t, top_p=self.top_p if t > 0 else None)


@dataclasses.dataclass
class Study:
  cfg: StudyConfig
  splits: code_tasks.Splits
  tokenizer: object
  model_config: ModelConfig
  sft_params: object
  train_rows: tuple      # (ids_BxP, mask_BxP) of the training split, one common width
  heldout_rows: tuple
  sft_s: float


def encode_rows(tasks, tok, max_len: int, width: int | None = None):
  """Left-padded RL prompts of `tasks` at one width (few compiled shapes)."""
  rows = [prompts_lib.encode_prompt(tok, prompts_lib.prompt_text(tok, t, None), max_len)
          for t in tasks]
  p = width or -(-max(len(r) for r in rows) // 16) * 16
  ids = np.full((len(rows), p), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), p), bool)
  for i, r in enumerate(rows):
    ids[i, p - len(r):], mask[i, p - len(r):] = r, True
  return ids, mask


def setup(cfg: StudyConfig, workdir: str, log=print) -> Study:
  """Splits, tokenizer (training text only), a random tiny model and its SFT warm start."""
  splits = code_tasks.code_splits(cfg.split_seed, cfg.sft_fraction)
  texts = []
  for t in splits.train:
    texts += [prompts_lib.build_question(t["question"], t["tests"]),
              prompts_lib.fenced_answer(t["solution"]),
              prompts_lib.fenced_answer(t["slip_solution"])]
  tok = train_sentencepiece(texts + ["system", "user", "assistant"], cfg.vocab_size,
                            os.path.join(workdir, "code_sp.model"))
  mc = ModelConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   intermediate_size=3 * cfg.hidden_size, num_layers=cfg.num_layers,
                   num_heads=4, num_kv_heads=2, head_dim=cfg.hidden_size // 4,
                   rope_theta=10_000.0, mask_token_id=tok.mask_id, pad_token_id=tok.pad_id,
                   eos_token_id=tok.eos_id)
  params = model_lib.init_params(mc, jax.random.key(0))
  start = time.perf_counter()
  if cfg.sft_steps:
    demos = code_tasks.teacher_demos(splits.sft, cfg.slip_rate, cfg.demo_copies,
                                     cfg.split_seed)
    params = warm_lib.warm_start(mc, params, demos, tok, steps=cfg.sft_steps,
                                 batch_size=cfg.sft_batch, lr=cfg.sft_lr,
                                 max_prompt_len=cfg.max_prompt_len, num_new=cfg.num_new,
                                 system_prompt=None, seed=0, log=log, log_every=100)
  sft_s = time.perf_counter() - start
  longest = max(len(tok.encode(prompts_lib.prompt_text(tok, t, None)))
                for t in splits.train + splits.heldout)
  width = -(-min(longest, cfg.max_prompt_len) // 16) * 16
  return Study(cfg, splits, tok, mc, params,
               encode_rows(splits.train, tok, cfg.max_prompt_len, width),
               encode_rows(splits.heldout, tok, cfg.max_prompt_len, width), sft_s)


# ----------------------------------------------------------------------------- evaluation


def harness_tasks(tasks) -> list[Task]:
  """Held-out tasks as the evaluation harness's Tasks (all asserts in one test)."""
  return [Task(task_id=f"code/{t['template']}_{t['k']}", prompt=mbpp_prompt(t["question"],
                                                                            t["tests"][0]),
               entry_point=f"{t['template']}_{t['k']}", test="\n".join(t["tests"]),
               canonical_solution=t["solution"], family="mbpp") for t in tasks]


def harness_answer(text: str) -> str:
  """The RL answer in the harness's instruct convention: the code after "```python\\n" up
  to the closing fence when the format reward is 1, else "" (which fails)."""
  code = rewards_lib.extract_code(text)
  if code is None or rewards_lib.format_reward(text) != 1.0:
    return ""
  return code + rewards_lib.CLOSE_FENCE


def sample_texts(study: Study, params, ids, mask, n: int, temperature: float, key):
  """n decoded completions per prompt row (valid tokens, specials stripped)."""
  ro = rollout_lib.rollout(study.model_config, params, ids, mask, group_size=n,
                           sampler_kwargs=study.cfg.sampler(temperature), rng=key,
                           end_id=study.tokenizer.chat_end_id)
  return decode_completions(study.tokenizer, rollout_lib.to_host_rollout(ro, n, None))


def harness_generate_fn(study: Study, params, tasks, key):
  """generate_fn(prompts, n) for `dcjax.eval.evaluate` over `tasks` (greedy when n == 1):
  each harness prompt is mapped back to its task's RL prompt."""
  ids, mask = encode_rows(tasks, study.tokenizer, study.cfg.max_prompt_len,
                          study.heldout_rows[0].shape[1])
  index = {build_prompt(t, "instruct"): i for i, t in enumerate(harness_tasks(tasks))}

  def generate_fn(prompts, n):
    rows = np.asarray([index[p] for p in prompts])
    texts = sample_texts(study, params, ids[rows], mask[rows], n, 0.0 if n == 1 else None,
                         key)
    return [[harness_answer(x) for x in texts[i * n:(i + 1) * n]] for i in range(len(rows))]

  return generate_fn


def sampled_rewards(study: Study, params, ids, mask, tasks, key) -> dict:
  """Mean code / format reward of `eval_samples` sampled completions per prompt row, through
  the RL reward path (sandboxed asserts); `code_per_task` is each row's mean."""
  n = study.cfg.eval_samples
  texts = sample_texts(study, params, ids, mask, n, None, key)
  b = rewards_lib.compute_rewards(texts, [t["tests"] for t in tasks for _ in range(n)])
  code_T = b.per_name["code"].reshape(len(tasks), n).mean(axis=1)
  return dict(code=float(code_T.mean()), format=float(b.per_name["format"].mean()),
              code_per_task=code_T.tolist())


def heldout_eval(study: Study, params, key, sampled: bool = True) -> dict:
  """Greedy pass@1 (harness) and, when `sampled`, the mean code / format reward of
  `eval_samples` sampled completions per held-out task (RL reward path)."""
  tasks = study.splits.heldout
  report = evaluate(harness_tasks(tasks), harness_generate_fn(study, params, tasks, key),
                    n_samples=1, ks=(1,), benchmark="code_heldout", batch_size=len(tasks),
                    progress=False)
  out = dict(pass1=report.pass_at_k["pass@1"])
  if sampled:
    out.update(sampled_rewards(study, params, *study.heldout_rows, tasks,
                               jax.random.fold_in(key, 1)))
  return out


# ----------------------------------------------------------------------------- RL


def make_learner(study: Study, kind: str) -> learner_lib.Learner:
  cfg = study.cfg
  section = grpo_config.add_grpo_sections(base_config()).optim
  section.update(lr=cfg.lr, grad_clip=1.0, warmup_steps=cfg.warmup_steps)
  tx, schedule = optim.make_optimizer(section, cfg.iterations * cfg.mu)
  lcfg = learner_lib.LearnerConfig(estimator=logprobs.EstimatorConfig(kind),
                                   loss=PolicyLossConfig(0.5, 0.5, cfg.beta))
  return learner_lib.Learner(study.model_config, lcfg, tx, schedule,
                             mask_id=study.tokenizer.mask_id)


def rl_run(study: Study, learner: learner_lib.Learner, seed: int, log=print,
           pool=None, final_eval: bool = True) -> dict:
  """One coupled-GRPO run (the learner's estimator) from the warm start; curves and finals.

  Prompts are drawn without replacement from the training tasks with indices in `pool`
  (default: all of them) each iteration.
  """
  cfg = study.cfg
  icfg = iteration.IterationConfig(
      group_size=cfg.group_size, num_iterations=cfg.mu, ref_update_every=cfg.ref_update_every,
      end_id=study.tokenizer.chat_end_id, sampler_kwargs=cfg.sampler())
  state = learner.init_state(jax.tree.map(jnp.copy, study.sft_params), seed)
  reward = TextReward(study.tokenizer)
  rng = np.random.default_rng(seed)
  ids, mask = study.train_rows
  pool = np.arange(len(study.splits.train)) if pool is None else np.asarray(pool)
  eval_key = jax.random.key(10_000 + seed)
  curve = dict(iteration=[], reward=[], code=[], format=[], eval_iteration=[0],
               heldout_pass1=[None])
  rl_s = 0.0
  with RewardWorker() as worker:
    for it in range(cfg.iterations):
      pick = rng.choice(pool, size=cfg.num_prompts, replace=False)
      start = time.perf_counter()
      state, m, _ = iteration.grpo_iteration(
          learner, state, ids[pick], mask[pick], [study.splits.train[i] for i in pick],
          reward, jax.random.key(seed * 1_000_003 + it), icfg, worker)
      rl_s += time.perf_counter() - start
      curve["iteration"].append(it + 1)
      curve["reward"].append(m["reward"])
      curve["code"].append(m["reward/code"])
      curve["format"].append(m["reward/format"])
      if final_eval and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iterations:
        curve["eval_iteration"].append(it + 1)
        curve["heldout_pass1"].append(heldout_eval(study, state.params, eval_key,
                                                   sampled=False)["pass1"])
      log(f"  {learner.cfg.estimator.kind} seed {seed} it {it + 1:3d} | reward "
          f"{m['reward']:.3f} code {m['reward/code']:.3f} format {m['reward/format']:.3f} | "
          f"{m['step_s']:.1f}s")
  final = heldout_eval(study, state.params, eval_key) if final_eval else {}
  if final_eval:
    curve["eval_iteration"].append(cfg.iterations)
    curve["heldout_pass1"].append(final["pass1"])
  return dict(final=final, curve=curve, rl_s=rl_s, params=state.params)


# ----------------------------------------------------------------------------- variance


def estimator_variance(study: Study, params, kind: str, draws: int = 16,
                       sequences: int = 24) -> float:
  """Mean over valid completion tokens of the per-token estimate's variance across `draws`
  mask keys, on [prompt, reference answer] of the first `sequences` training tasks."""
  tasks = study.splits.train[:sequences]
  ids, mask, comp = warm_lib.sft_rows(tasks, study.tokenizer,
                                      max_prompt_len=study.cfg.max_prompt_len,
                                      num_new=study.cfg.num_new, system_prompt=None)
  tokens = jnp.asarray(np.concatenate([ids, comp], axis=1))
  keep = jnp.concatenate([jnp.asarray(mask), jnp.ones(comp.shape, bool)], axis=1)
  valid = np.asarray(rollout_lib.completion_mask(jnp.asarray(comp), study.tokenizer.chat_end_id))
  ecfg = logprobs.EstimatorConfig(kind)

  @jax.jit
  def draw(key):
    noise = logprobs.draw_noise(key, tokens.shape[0], comp.shape[1], ecfg)
    return logprobs.per_token_logps(study.model_config, params, tokens, noise, ecfg,
                                    study.tokenizer.mask_id, keep_BxL=keep)[0]

  est_DxBxN = np.stack([np.asarray(draw(jax.random.key(7_000 + d))) for d in range(draws)])
  return float(est_DxBxN.var(axis=0, ddof=1)[valid].mean())
