"""`mode="train"`: masked-diffusion pretraining / SFT, end to end.

tokenizer -> model (init or HF) -> sharded train state (or restore) -> compiled step (memory
analysis printed) -> loop with one-step-late metrics, held-out ELBO, async checkpoints,
SIGTERM / SIGINT (save, stop, exit status 75) and non-finite handling -> final checkpoint ->
one sample completion.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dcjax import config as config_lib
from dcjax import workdir as workdir_lib
from dcjax.data import pipeline, sources, tokenizer_cache
from dcjax.model.loading import load_or_init
from dcjax.parallel import mesh as mesh_lib
from dcjax.train import checkpoint as ckpt_lib
from dcjax.train import completion, metrics as metrics_lib, preemption, profiling
from dcjax.train import handoff
from dcjax.train import reporting
from dcjax.train import state as state_lib
from dcjax.train import programs
from dcjax.train import step as step_lib
from dcjax.train.reporting import NonFiniteLossError, log
from dcjax.train.train_config import check_seq_len, loss_config
from dcjax.train.train_config import validate  # noqa: F401 (the mode's validation hook)

def _model(config, mesh, restoring: bool, tok, source=None):
  """`model.loading.load_or_init` (from `source`, config.init_from's checkpoint, when set); a
  checkpoint without a mask id in its config.json (an AR model being adapted) gets the
  tokenizer's <|mask|>."""
  model_config, params = load_or_init(config, mesh, restoring=restoring, source=source)
  if model_config.mask_token_id is None:
    model_config = dataclasses.replace(model_config, mask_token_id=tok.mask_id)
  return model_config, params


def _check_batch(config, mesh, shard: pipeline.HostShard) -> None:
  t = config.train
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if (t.batch_size // t.micro_batches) % batch_shards:
    raise ValueError(f"config.train.batch_size={t.batch_size} / config.train.micro_batches="
                     f"{t.micro_batches} must be divisible by the mesh's data x fsdp = "
                     f"{batch_shards} batch shards")
  if t.batch_size % shard.count:
    raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by the "
                     f"{shard.count} hosts")


def train(config, workdir: "str | workdir_lib.Workdir", *, hooks=()) -> dict:
  """Runs training; returns {"state", "stopped", "steps_done", "last_metrics", ...}.

  `hooks`: callables `hook(step, metrics)` run on the host when a step's metrics arrive.
  """
  wd = workdir_lib.resolve(workdir)
  ckpt = ckpt_lib.Checkpointer.from_config(wd.checkpoints, config.checkpoint, after_save=wd.push,
                                          log=log)
  try:
    return _train(config, wd, ckpt, hooks)
  finally:
    ckpt.close()  # waits for an async save in flight
    wd.push()


def _train(config, wd: workdir_lib.Workdir, ckpt: ckpt_lib.Checkpointer, hooks) -> dict:
  d, t = config.data, config.train
  mesh = mesh_lib.make_mesh(config.mesh)
  log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")
  source = sources.make_source(d)
  train_docs, eval_docs = pipeline.split_source(source, int(d.eval_docs))
  log(f"data: {source!r}: {len(train_docs)} training / {len(eval_docs)} held-out records")
  sources.require_text(train_docs, d, "training", source)
  if t.eval_batches:
    sources.require_text(eval_docs, d, "held-out", source)
  init_from = handoff.from_config(config, "init_from")  # params only; step 0, fresh AdamW
  if init_from is not None and not (init_from.tokenizer_path or d.get("tokenizer")):
    raise config_lib.ConfigError(
        f"config.init_from: checkpoint {init_from.where} records no tokenizer and its workdir "
        "has no tokenizer/sp*.model; set config.data.tokenizer to the one that run used")
  tok = tokenizer_cache.get_tokenizer(config, wd, train_docs, log=log,
                                      init_from_path=init_from and init_from.tokenizer_path)
  latest = ckpt.latest_step() if config.checkpoint.restore else None
  model_config, params = _model(config, mesh, restoring=latest is not None, tok=tok,
                                source=init_from)
  if init_from is not None and latest is None:
    log(f"initialised from {init_from.where} (params only: step 0, fresh optimiser state)")
  if config.get("hf_dir") or init_from is not None:
    where = (f"{init_from.where} meta" if init_from is not None
             else f"{config.hf_dir}/config.json")
    check_seq_len(config, model_config, where)
  tokenizer_cache.check_against_model(tok, model_config)
  program = programs.train_program(config, model_config, mesh, tok.mask_id)
  tx, shardings = program.tx, program.shardings
  abstract = program.abstract_state
  log(f"model: {state_lib.num_params(abstract.params):,} parameters, {model_config}")

  shard = pipeline.HostShard.current()
  _check_batch(config, mesh, shard)
  seed = config.seed if d.shuffle_seed < 0 else d.shuffle_seed
  iterator = iter(pipeline.dataset_from_config(
      d, train_docs, tok, batch_size=t.batch_size // shard.count, seed=seed, shard=shard))
  meta = ckpt_lib.make_meta(model_config, config, abstract,
                            tokenizer=handoff.tokenizer_record(tok, wd))
  if latest is not None:
    latest, state = ckpt.restore_latest(abstract, iterator, meta)  # the newest that verifies
    log(f"restored step {latest} from {ckpt.directory}")
  else:
    state = state_lib.init_state(params, tx, config.seed, shardings)
  del params
  start_step = int(jax.device_get(state.step))
  if start_step >= t.steps:
    log(f"step {start_step} >= config.train.steps={t.steps}: nothing to train")
    return dict(state=state, stopped="completed", steps_done=start_step, last_metrics=None,
                eval_metrics=None, tokenizer=tok, model_config=model_config,
                checkpoint_dir=ckpt.directory)

  lcfg = loss_config(config)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_shardings = program.batch_shardings
  start = time.perf_counter()
  compiled = program.lower(mesh).compile()
  log(f"compiled the train step in {time.perf_counter() - start:.1f}s; memory per device: "
      f"{compiled.memory_analysis()}")

  eval_fn = jax.jit(step_lib.make_eval_step(model_config, lcfg, mask_id=tok.mask_id),
                    in_shardings=(shardings.params, batch_shardings, None),
                    out_shardings=replicated)
  eval_batch = t.eval_batch_size or t.batch_size // t.micro_batches
  eval_set = [pipeline.to_global(b, mesh) for b in pipeline.take_batches(
      pipeline.dataset_from_config(d, eval_docs, tok, batch_size=eval_batch // shard.count,
                                   seed=0, shard=shard, repeat=False), t.eval_batches)]
  if t.eval_batches and not eval_set:
    raise sources.DataError(
        f"{source!r}: the {len(eval_docs)} held-out records (config.data.eval_docs) fill no "
        f"[{eval_batch}, {d.seq_len}] batch: raise config.data.eval_docs, or set "
        "config.train.eval_batches=0 for no held-out evaluation")

  tokens_per_step = t.batch_size * d.seq_len
  flops_per_step = metrics_lib.train_flops_per_token(model_config, d.seq_len) * tokens_per_step
  peak, peak_source = metrics_lib.peak_flops(cpu_dtype=np.dtype(model_config.dtype))
  log(f"train FLOPs/step {flops_per_step:.3e} (bidirectional attention); peak {peak:.3e} "
      f"FLOP/s ({peak_source})")

  def latest_checkpoint():
    step = ckpt.latest_step()
    return "none" if step is None else f"step {step} in {ckpt.directory}"

  reporter = reporting.Reporter(
      wd.local, total_steps=t.steps, start_step=start_step, log_every=t.log_every,
      tokens_per_step=tokens_per_step, flops_per_step=flops_per_step, peak_flops=peak,
      latest_checkpoint=latest_checkpoint, hooks=hooks,
      writer_options=metrics_lib.writer_options(config, wd, "train/loss"))
  profiler = profiling.Profiler(config, wd.path("profile"), log=log)

  def evaluate(step, params):
    metrics = reporting.held_out(eval_fn, eval_set, params, mesh, config.seed)
    if metrics is not None:
      reporter.evaluation(step, metrics)

  try:
    state, stopped = _loop(state, start_step, compiled, iterator, reporter, evaluate, ckpt,
                           meta, mesh, t, profiler)
  finally:
    profiler.stop()
    reporter.close()
  return dict(state=state, stopped=stopped, steps_done=int(jax.device_get(state.step)),
              last_metrics=reporter.last_metrics, eval_metrics=reporter.eval_metrics,
              tokenizer=tok, model_config=model_config, checkpoint_dir=ckpt.directory)


def _loop(state, start_step, compiled, iterator, reporter, evaluate, ckpt, meta, mesh, t,
          profiler=None):
  """The step loop: (final state, "completed" | "preempted").

  A step's metrics are fetched after the next step is dispatched; at a sync point (eval,
  checkpoint, preemption, the end) they are fetched first, so a checkpoint only ever holds
  a state whose loss and gradient were finite.
  """
  pending = None
  with preemption.Preemption() as signals:
    if start_step == 0:
      evaluate(0, state.params)
    reporter.restart_clock()
    for step in range(start_step, t.steps):
      if profiler is not None:
        profiler.before(step, wait_for=state)  # config.profile_steps
      data_start = time.perf_counter()
      batch = pipeline.to_global(next(iterator), mesh)
      data_time = time.perf_counter() - data_start
      with jax.set_mesh(mesh):
        state, device_metrics = compiled(state, batch)
      if pending is not None:
        reporter.step(*pending)
      done = step + 1
      pending = (done, device_metrics, data_time)
      ckpt.check()  # a failed background save stops the run here, not an interval later
      multihost_preempt = jax.process_count() > 1 and ckpt.manager.reached_preemption(done)
      is_last, eval_due, save_due = done == t.steps, done % t.eval_every == 0, ckpt.should_save(done)
      if not (signals.requested or multihost_preempt or done == t.preempt_at_step
              or is_last or eval_due or save_due):
        continue
      reporter.step(*pending)  # sync point; a hook may raise SIGTERM here
      pending = None
      preempt = signals.requested or multihost_preempt or done == t.preempt_at_step
      if eval_due or is_last:
        evaluate(done, state.params)
      if preempt or is_last or save_due:
        ckpt.save(done, state, iterator, meta, force=True)
        reporter.restart_clock()
      if preempt:
        why = signals.requested or ("the pod's preemption notice" if multihost_preempt
                                    else "config.train.preempt_at_step")
        log(f"preempted after step {done} ({why}): checkpoint saved to {ckpt.directory}")
        return state, "preempted"
    if pending is not None:
      reporter.step(*pending)
  return state, "completed"


def run(config, workdir: "str | workdir_lib.Workdir") -> None:
  ckpt_lib.quiet_orbax_logs()
  start = time.perf_counter()
  try:
    result = train(config, workdir)
  except (NonFiniteLossError, ckpt_lib.CheckpointError, sources.DataError,
          config_lib.ConfigError) as e:
    raise SystemExit(f"error: {e}") from None
  log(f"training {result['stopped']} at step {result['steps_done']} in "
      f"{time.perf_counter() - start:.0f}s; checkpoints in {result['checkpoint_dir']}")
  if result["stopped"] == "preempted":
    log(f"exit status {preemption.EXIT_PREEMPTED}: rerun the same command to resume")
    raise SystemExit(preemption.EXIT_PREEMPTED)
  if not config.train.sample_new_tokens:
    return
  text, which = completion.complete(
      config, result["model_config"], result["state"].params, result["tokenizer"],
      config.train.sample_prompt, max_new_tokens=config.train.sample_new_tokens,
      steps=config.train.sample_steps, mesh=mesh_lib.make_mesh(config.mesh))
  log(f"sample completion ({which}):\n----- prompt -----\n{config.train.sample_prompt}"
      f"----- completion -----\n{text}\n------------------")
