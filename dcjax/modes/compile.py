"""`mode="compile"`: compile a config's real programs ahead of time for a TPU slice, on any host.

  python -m dcjax.main --config configs/diffucoder_7b_adapt.py --config.mode=compile \\
      --config.compile_topology=v5p-64 [--config.compile_num_slices=1]

The programs are built by the same code the job runs (its mesh over the slice's devices, its
shardings, shapes and flags), lowered from abstract inputs and compiled by libtpu here:
  train: the train step;  grpo: the rollout sampler, the scoring pass, the policy update;
  sample / eval: the sampler.
Which job is meant follows from the config's sections (rl, train, eval, else sampler). Each
program's memory per chip is printed; the last line is one JSON object; the exit status is 1
when a program does not fit (docs/compile.md).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np

from dcjax import config as config_lib
from dcjax.model.loading import load_or_init
from dcjax.parallel import mesh as mesh_lib
from dcjax.parallel import topology
from dcjax.parallel.rules import MESH_AXES

GIB = topology.GIB


def target_mode(config) -> str:
  """The job whose programs are compiled: grpo, train, eval or sample."""
  for section, mode in (("rl", "grpo"), ("train", "train"), ("eval", "eval"),
                        ("sampler", "sample")):
    if section in config:
      return mode
  raise config_lib.ConfigError("config has none of the sections rl / train / eval / sampler: "
                               "nothing to compile")


def validate(config) -> None:
  name = config.get("compile_topology", "")
  if not name:
    raise config_lib.ConfigError("config.compile_topology is empty: name a TPU slice as gcloud "
                                 "does, e.g. --config.compile_topology=v5p-64")
  try:
    topology.parse(name)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.compile_topology: {e}") from None
  slices = config.get("compile_num_slices", 1)
  if not isinstance(slices, int) or slices < 1:
    raise config_lib.ConfigError(f"config.compile_num_slices={slices!r} must be an integer >= 1")
  fraction = config.get("compile_hbm_fraction", 0.9)
  if not 0 < fraction <= 1:
    raise config_lib.ConfigError(f"config.compile_hbm_fraction={fraction!r} must lie in (0, 1]")
  # The job's own validation also wants its data and checkpoint paths, which a compile does
  # not read; the sampler options are checked here, the rest when the programs are built.
  target_mode(config)
  if "sampler" in config:
    from dcjax.diffusion.sampler_config import validate_sampler
    validate_sampler(config.sampler)


def _model_config(config, mesh):
  model_config, _ = load_or_init(config, mesh, restoring=True)  # config.json only, no weights
  if model_config.mask_token_id is None:
    raise config_lib.ConfigError("config.model.mask_token_id is unset (the run takes it from "
                                 "the tokenizer): set it to compile without one")
  return model_config


def _batch_shards(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in MESH_AXES[:2]]))


def _round_up(n: int, multiple: int) -> int:
  return -(-int(n) // int(multiple)) * int(multiple)


def train_programs(config, mesh):
  from dcjax.train import metrics as metrics_lib
  from dcjax.train import programs
  model_config = _model_config(config, mesh)
  program = programs.train_program(config, model_config, mesh, model_config.mask_token_id)
  seq_len, batch = int(config.data.seq_len), int(config.train.batch_size)
  flops = metrics_lib.train_flops_per_token(model_config, seq_len) * batch * seq_len
  rows = batch // int(config.train.micro_batches) / _batch_shards(mesh)
  yield "train_step", lambda: program.lower(mesh), dict(
      model_flops_per_step=flops, rows_per_chip_per_micro_batch=rows, seq_len=seq_len)


def grpo_programs(config, mesh):
  import jax.numpy as jnp
  from dcjax.diffusion import sampler, sampler_config
  from dcjax.modes import grpo
  from dcjax.rl import learner as learner_lib
  model_config = _model_config(config, mesh)
  r, p = config.rl, config.prompts
  tx, schedule = grpo.make_optimizer(config)
  learner = learner_lib.Learner(model_config, grpo.learner_config(config), tx, schedule,
                                mask_id=model_config.mask_token_id, mesh=mesh)
  state = learner.abstract_state()
  b = int(r.num_prompts) * int(r.num_generations)
  prompt_len = _round_up(p.max_prompt_len, max(int(p.pad_multiple), 1))
  kwargs = sampler_config.sampler_kwargs(config.sampler)
  n = int(kwargs["max_new_tokens"])
  info = dict(batch=b, prompt_len=prompt_len, new_tokens=n)
  yield "rollout_sampler", lambda: sampler.lower(model_config, state.params, b, prompt_len,
                                                 mesh=mesh, **kwargs), info

  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MESH_AXES[:2]))

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  batch = dict(tokens_BxL=spec((b, prompt_len + n), jnp.int32),
               keep_BxL=spec((b, prompt_len + n), jnp.bool_),
               completion_mask_BxN=spec((b, n), jnp.bool_))
  key = jax.random.key(0)
  if int(r.num_iterations) > 1 or learner.cfg.uses_reference:
    yield "score", lambda: _lower(mesh, learner.jitted("score"), state.params, batch, key), info
  update = dict(batch, advantages_B=spec((b,), jnp.float32))
  if int(r.num_iterations) > 1:
    update["old_logp_BxN"] = spec((b, n), jnp.float32)
  if learner.cfg.uses_reference:
    update["ref_logp_BxN"] = spec((b, n), jnp.float32)
  yield "policy_update", lambda: _lower(mesh, learner.jitted("update"), state, update, key), info


def sampler_programs(config, mesh, rows: int):
  import flax.linen as nn
  from dcjax import model as model_lib
  from dcjax.diffusion import sampler, sampler_config
  model_config = _model_config(config, mesh)
  shardings = model_lib.param_shardings(model_config, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(model_lib.abstract_params(model_config)), shardings)
  batch = _round_up(rows, _batch_shards(mesh))
  prompt_len = int(config.compile_prompt_len)
  kwargs = sampler_config.sampler_kwargs(config.sampler)
  yield "sampler", lambda: sampler.lower(model_config, params, batch, prompt_len, mesh=mesh,
                                         **kwargs), dict(batch=batch, prompt_len=prompt_len)


def _lower(mesh, jitted, *args):
  with jax.set_mesh(mesh):
    return jitted.lower(*args)


def programs_of(config, mesh):
  mode = target_mode(config)
  if mode == "train":
    return train_programs(config, mesh)
  if mode == "grpo":
    return grpo_programs(config, mesh)
  rows = (int(config.eval.batch_size) * int(config.eval.n_samples) if mode == "eval"
          else int(config.get("num_samples", 1)))
  return sampler_programs(config, mesh, rows)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  return dict(arguments_gib=m.argument_size_in_bytes / GIB,
              outputs_gib=m.output_size_in_bytes / GIB,
              temporaries_gib=m.temp_size_in_bytes / GIB, aliased_gib=m.alias_size_in_bytes / GIB,
              peak_gib_per_chip=peak / GIB, xla_flops_per_chip=float(cost.get("flops", 0.0)))


def compile_all(config, log=print) -> dict:
  """Compiles every program; returns the report (see the module docstring)."""
  tpu_slice = topology.parse(config.compile_topology)
  devices = topology.devices(tpu_slice, int(config.compile_num_slices))
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  hbm = tpu_slice.hbm_bytes / GIB
  budget = float(config.compile_hbm_fraction) * hbm
  log(f"compiling {target_mode(config)} programs for {tpu_slice.name} x "
      f"{config.compile_num_slices} ({tpu_slice.topology_name}, {len(devices)} chips, "
      f"{hbm:.1f} GiB HBM each; fits = peak <= {budget:.1f} GiB), mesh {dict(mesh.shape)}")
  report = dict(topology=tpu_slice.name, num_slices=int(config.compile_num_slices),
                chips=len(devices), hbm_gib_per_chip=hbm, programs={})
  for name, lower, info in programs_of(config, mesh):
    start = time.perf_counter()
    try:
      compiled = lower().compile()
    except Exception as e:  # XLA refuses a program that cannot fit: RESOURCE_EXHAUSTED
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      first = str(e).strip().splitlines()[0][:400]
      report["programs"][name] = dict(info, fits=False, error=first)
      log(f"{name}: does not compile for {tpu_slice.name}: {first}")
      continue
    entry = dict(info, **_memory(compiled), compile_s=time.perf_counter() - start)
    entry["fits"] = entry["peak_gib_per_chip"] <= budget
    report["programs"][name] = entry
    flops = entry.get("model_flops_per_step")
    log(f"{name}: peak {entry['peak_gib_per_chip']:.2f} GiB per chip of {hbm:.1f} "
        f"({'fits' if entry['fits'] else 'DOES NOT FIT'}): arguments "
        f"{entry['arguments_gib']:.2f}, temporaries {entry['temporaries_gib']:.2f}, outputs "
        f"{entry['outputs_gib']:.2f}, aliased {entry['aliased_gib']:.2f} GiB; XLA FLOPs per chip "
        f"{entry['xla_flops_per_chip']:.3e} (loop bodies counted once)"
        + (f"; model FLOPs per step {flops:.3e}" if flops else "")
        + f"; compiled in {entry['compile_s']:.0f}s")
  return report


def run(config, config_file: str = "") -> None:
  """Prints the report; exits 1 naming the first program that does not fit."""
  validate(config)
  report = dict(config=config_file, **compile_all(config))
  print(json.dumps(report), flush=True)
  bad = [(n, p) for n, p in report["programs"].items() if not p["fits"]]
  if bad:
    name, entry = bad[0]
    figure = (f"peak {entry['peak_gib_per_chip']:.2f} GiB per chip" if "peak_gib_per_chip" in entry
              else entry["error"])
    sys.exit(f"error: {name} does not fit {report['topology']} "
             f"({report['hbm_gib_per_chip']:.1f} GiB HBM per chip, budget "
             f"{config.compile_hbm_fraction:.0%}): {figure}")
