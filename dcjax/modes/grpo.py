"""`mode="grpo"`: coupled-GRPO end to end (docs/grpo.md).

tasks + tokenizer -> model (init or HF) on the mesh -> optional SFT warm start -> RL state
(policy, AdamW, reference, rng) or a restored checkpoint -> loop of `grpo_iteration`s with
metrics to stdout and `<workdir>/metrics.jsonl`, orbax checkpoints of the state and the
grain prompt iterator in `<workdir>/checkpoints/` (a rerun resumes), SIGTERM / SIGINT handling
(save, stop, exit status `preemption.EXIT_PREEMPTED`).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from dcjax import workdir as workdir_lib
from dcjax.config import ConfigError
from dcjax.data import tokenizer as tokenizer_lib
from dcjax.data import tokenizer_cache
from dcjax.diffusion import sampler_config
from dcjax.model.config import RUNTIME_FIELDS
from dcjax.model.loading import load_or_init
from dcjax.parallel import mesh as mesh_lib
from dcjax.rl import grpo_config, iteration, learner as learner_lib, logprobs, prompts
from dcjax.rl import warm_start as warm_lib
from dcjax.rl.grpo_config import validate  # noqa: F401  (the mode's validation hook)
from dcjax.rl.loss import PolicyLossConfig
from dcjax.rl.reward_worker import RewardWorker, TextReward
from dcjax.train import checkpoint as ckpt_lib
from dcjax.train import handoff
from dcjax.train import metrics as metrics_lib
from dcjax.train import optim
from dcjax.train import preemption
from dcjax.train import profiling
from dcjax.train.reporting import NonFiniteLossError

def _log(message: str) -> None:
  # tqdm.write clears the progress bar (stderr), prints the line, then redraws the bar.
  if jax.process_index() == 0:
    tqdm.write(message)
    sys.stdout.flush()


def _progress_bar(total: int, initial: int) -> tqdm:
  """The iteration bar: process 0 only, and only on a terminal (`disable=None`), so a job's
  log file gets the log lines and no carriage-return redraws."""
  return tqdm(total=total, initial=initial, desc="grpo", unit="iter", dynamic_ncols=True,
              leave=False, disable=None if jax.process_index() == 0 else True)


def learner_config(config) -> learner_lib.LearnerConfig:
  r = config.rl
  est = logprobs.EstimatorConfig(kind=r.estimator, num_pairs=int(r.num_pairs),
                                 t_min=float(r.t_min), t_max=float(r.t_max),
                                 attention_mask=bool(r.logp_attention_mask))
  loss = PolicyLossConfig(epsilon_low=float(r.epsilon_low), epsilon_high=float(r.epsilon_high),
                          beta=float(r.beta))
  return learner_lib.LearnerConfig(estimator=est, loss=loss, micro_batches=int(r.micro_batches),
                                   ref_update=r.ref_update, ref_mix_alpha=float(r.ref_mix_alpha))


def iteration_config(config, end_id: int) -> iteration.IterationConfig:
  r = config.rl
  return iteration.IterationConfig(
      group_size=int(r.num_generations), num_iterations=int(r.num_iterations),
      advantage=r.advantage, scale_rewards=bool(r.scale_rewards),
      ref_update_every=int(r.ref_update_every),
      sampler_kwargs=sampler_config.sampler_kwargs(config.sampler), end_id=int(end_id))


def make_optimizer(config):
  """config.optim's AdamW over rl.steps x num_iterations optimiser steps."""
  return optim.make_optimizer(config.optim,
                              int(config.rl.steps) * int(config.rl.num_iterations))


def get_tokenizer(config, workdir: "str | workdir_lib.Workdir", tasks, init_from=None):
  """config.prompts.tokenizer, else hf_dir's, else the config.init_from run's (`init_from`, a
  `handoff.Source`), else sentencepiece trained on the tasks (cached)."""
  p = config.prompts
  if p.tokenizer:
    return tokenizer_lib.load_tokenizer(p.tokenizer)
  if config.get("hf_dir"):
    return tokenizer_lib.load_tokenizer(config.hf_dir)
  if init_from is not None:
    if not init_from.tokenizer_path:
      raise ConfigError(f"config.init_from: checkpoint {init_from.where} records no tokenizer "
                        "and its workdir has no tokenizer/sp*.model; set "
                        "config.prompts.tokenizer to the one that run used")
    return tokenizer_lib.load_tokenizer(init_from.tokenizer_path)

  def train(path):
    texts = []
    for task in tasks:
      texts.append(prompts.build_question(task["question"], task["tests"], p.add_first_test))
      if task.get("solution"):
        texts.append(prompts.fenced_answer(task["solution"]))
    texts += [p.system_prompt] * 4 + ["system", "user", "assistant"]
    tok = tokenizer_lib.train_sentencepiece(texts, int(p.tokenizer_vocab_size), path)
    _log(f"tokenizer: trained sentencepiece ({tok.vocab_size} pieces) -> {path}")

  wd = workdir_lib.resolve(workdir)
  return tokenizer_lib.load_tokenizer(
      wd.shared_file(f"tokenizer/sp{int(p.tokenizer_vocab_size)}.model", train))


def _meta(model_config, config, state_abstract) -> dict:
  flat = {jax.tree_util.keystr(path): list(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state_abstract)}
  r, p = config.rl, config.prompts
  return dict(
      model={k: v for k, v in model_config.to_dict().items() if k not in RUNTIME_FIELDS},
      data=dict(source=p.source, path=p.path, max_prompt_len=int(p.max_prompt_len),
                synthetic_tasks=int(p.synthetic_tasks)),
      train=dict(num_prompts=int(r.num_prompts), num_generations=int(r.num_generations),
                 uses_reference=float(r.beta) > 0),
      state_shapes=flat)


def train_grpo(config, workdir: "str | workdir_lib.Workdir", *, reward_fn=None, hooks=(), mesh=None) -> dict:
  """Runs the RL loop; returns {"state", "history" (metrics per step), "stopped",
  "iterator" (the prompt iterator, positioned after the last batch), ...}.

  `reward_fn(HostRollout, tasks) -> RewardResult` replaces the text rewards (tests);
  `hooks`: callables `hook(step, metrics)` after each iteration; `mesh` replaces the one
  config.mesh describes over all devices.
  """
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
  r, p = config.rl, config.prompts
  _log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")
  tasks = prompts.make_tasks(p)
  wd = workdir_lib.resolve(workdir)
  init_from = handoff.from_config(config, "init_from")  # params only; fresh optimiser
  tok = get_tokenizer(config, wd, tasks, init_from)
  ckpt = ckpt_lib.Checkpointer.from_config(wd.checkpoints, config.checkpoint, after_save=wd.push,
                                          log=_log)
  latest = ckpt.latest_step() if config.checkpoint.restore else None
  model_config, params = load_or_init(config, mesh, restoring=latest is not None,
                                      source=init_from)
  if model_config.mask_token_id is None:
    model_config = dataclasses.replace(model_config, mask_token_id=tok.mask_id)
  tokenizer_cache.check_against_model(tok, model_config)

  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = r.num_prompts * r.num_generations
  hosts = jax.process_count()
  if r.num_prompts % hosts or (batch // r.micro_batches) % shards:
    raise ValueError(f"config.rl.num_prompts={r.num_prompts} x num_generations="
                     f"{r.num_generations} / micro_batches={r.micro_batches} must split evenly "
                     f"over {hosts} hosts and the mesh's data x fsdp = {shards} batch shards")
  tx, schedule = make_optimizer(config)
  learner = learner_lib.Learner(model_config, learner_config(config), tx, schedule,
                                mask_id=tok.mask_id, mesh=mesh)
  seed = config.seed if p.shuffle_seed < 0 else p.shuffle_seed
  iterator = iter(prompts.prompt_dataset(
      tasks, tok, batch_size=r.num_prompts // hosts, seed=seed, max_len=int(p.max_prompt_len),
      system_prompt=p.system_prompt, add_first_test=bool(p.add_first_test),
      shard_index=jax.process_index(), shard_count=hosts))
  abstract = learner.abstract_state()
  meta = _meta(model_config, config, abstract)
  meta["tokenizer"] = handoff.tokenizer_record(tok, wd)  # read by handoff; not compared
  if latest is not None:
    latest, state = ckpt.restore_latest(abstract, iterator, meta)  # the newest that verifies
    _log(f"restored iteration {latest} from {ckpt.directory}")
  else:
    if config.warm_start.steps:
      w = config.warm_start
      with jax.set_mesh(mesh):
        params = warm_lib.warm_start(
            model_config, params, tasks, tok, steps=int(w.steps), batch_size=int(w.batch_size),
            lr=float(w.lr), max_prompt_len=int(p.max_prompt_len),
            num_new=int(config.sampler.max_new_tokens), system_prompt=p.system_prompt,
            seed=config.seed, add_first_test=bool(p.add_first_test), log=_log,
            log_every=int(w.log_every))
    state = learner.init_state(params, config.seed)
  del params
  start_iter = latest or 0

  reward_fn = reward_fn or TextReward(tok, dict(r.reward_weights), timeout_s=r.reward_timeout_s,
                                      workers=int(r.reward_workers) or None)
  icfg = iteration_config(config, tok.chat_end_id)
  # Records past the restored step belong to a run that died before saving them: dropped.
  writer = metrics_lib.MetricWriter(wd.local, enabled=jax.process_index() == 0,
                                    start_step=start_iter,
                                    **metrics_lib.writer_options(config, wd, "grpo/reward"))
  profiler = profiling.Profiler(config, wd.path("profile"), log=_log)
  bar = _progress_bar(int(r.steps), start_iter)
  result = dict(stopped="completed", history=[], tokenizer=tok, model_config=model_config,
                checkpoint_dir=ckpt.directory)
  root = jax.random.wrap_key_data(jax.device_get(state.rng))
  try:
    with RewardWorker() as worker, preemption.Preemption() as signals:
      for it in range(start_iter, int(r.steps)):
        profiler.before(it, wait_for=state)  # config.profile_steps, in iterations
        ids, mask, index = prompts.collate(next(iterator), int(p.pad_multiple))
        key = jax.random.fold_in(root, it)
        state, m, rewards = iteration.grpo_iteration(
            learner, state, ids, mask, [tasks[i] for i in index], reward_fn, key, icfg, worker)
        done = it + 1
        ckpt.check()  # a failed background save stops the run here, not an interval later
        m["iteration"], m["optimizer_step"] = done, done * int(r.num_iterations)
        result["history"].append(m)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.4f}", refresh=False)
        if done % r.log_every == 0 or done == r.steps or done == start_iter + 1:
          writer.write(done, m, prefix="grpo")
          _log(_line(done, m))
          for text in (rewards.texts or [])[:int(r.log_completions)]:
            _log(f"  completion: {text!r}")
        for hook in hooks:
          hook(done, m)
        last = done == r.steps
        # On a pod only some hosts may get SIGTERM; orbax agrees on a step for all of them.
        preempt = signals.requested or (jax.process_count() > 1
                                        and ckpt.manager.reached_preemption(done))
        if preempt or last or ckpt.should_save(done):
          ckpt.save(done, state, iterator, meta, force=True)
        if preempt:
          result["stopped"] = "preempted"
          _log(f"preempted after iteration {done}: checkpoint saved to {ckpt.directory}")
          break
  finally:
    profiler.stop()
    bar.close()
    ckpt.close()
    writer.close()
    wd.push()
  result["state"], result["iterator"] = state, iterator
  return result


def _line(step: int, m: dict) -> str:
  parts = [f"iter {step:4d}", f"reward {m['reward']:.3f}"]
  parts += [f"{k[7:]} {v:.3f}" for k, v in m.items() if k.startswith("reward/")]
  parts += [f"zero-var {m['zero_variance_groups']:.2f}", f"len {m['completion_length']:.1f}",
            f"clip {m['clip_fraction']:.3f}", f"kl {m['kl']:.4f}", f"ent {m['entropy']:.2f}",
            f"AR local/global {m['local_arness']:.2f}/{m['global_arness']:.2f}",
            f"{m['step_s']:.1f}s (rollout {100 * m['rollout_share']:.0f}%, update "
            f"{100 * m['update_share']:.0f}%, reward wait {100 * m['reward_wait_share']:.0f}%)"]
  return " | ".join(parts)


def run(config, workdir: "str | workdir_lib.Workdir") -> None:
  ckpt_lib.quiet_orbax_logs()
  start = time.perf_counter()
  try:
    result = train_grpo(config, workdir)
  except (NonFiniteLossError, ckpt_lib.CheckpointError, ConfigError) as e:
    raise SystemExit(f"error: {e}") from None
  hist = result["history"]
  if hist:
    first, last = hist[0], hist[-1]
    k = min(5, len(hist))
    head = np.mean([h["reward"] for h in hist[:k]])
    tail = np.mean([h["reward"] for h in hist[-k:]])
    _log(f"grpo {result['stopped']}: {len(hist)} iterations in {time.perf_counter() - start:.0f}s;"
         f" reward {first['reward']:.3f} -> {last['reward']:.3f} (mean of first/last {k}: "
         f"{head:.3f} -> {tail:.3f}); checkpoints in {result['checkpoint_dir']}")
  if result["stopped"] == "preempted":
    _log(f"exit status {preemption.EXIT_PREEMPTED}: rerun the same command to resume")
    raise SystemExit(preemption.EXIT_PREEMPTED)


__all__ = ["run", "train_grpo", "validate"]
