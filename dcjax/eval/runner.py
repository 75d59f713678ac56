"""Benchmarks from a config: validation of `config.eval` and `run_eval(config, generate_fn)`.

Config sections read here (see configs/eval_humaneval.py):
  config.eval     benchmark, data_path, n_samples, k, prompt_style, output_dir, timeout_s,
                  memory_mb, workers, batch_size, limit; optional (defaults in EVAL_DEFAULTS):
                  scorer (auto | evalplus | approximate), min_time_limit and
                  gt_time_limit_factor (evalplus's per-input time limits)
  config.sampler  the shared sampler section (dcjax/diffusion/sampler_config.py) of the
                  sampler that makes generate_fn; recorded in the summary
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from dcjax.config import ConfigError
from dcjax.diffusion.sampler_config import validate_sampler
from dcjax.eval import evalplus_score
from dcjax.eval.harness import EvalReport, GenerateFn, evaluate
from dcjax.eval.prompts import PROMPT_STYLES
from dcjax.eval.tasks import BENCHMARKS, load_benchmark
from dcjax.execution import SandboxConfig


# Fields a config may leave out (configs written before them): EvalPlus's own defaults.
EVAL_DEFAULTS = {"scorer": "auto", "min_time_limit": 1.0, "gt_time_limit_factor": 4.0}


def _optional(ev: Any, name: str) -> Any:
  return ev.get(name, EVAL_DEFAULTS[name])


def _get(section: Any, name: str, where: str) -> Any:
  try:
    return section[name]
  except (KeyError, AttributeError, TypeError):
    raise ConfigError(f"{where}.{name} is missing") from None


def validate(config: Any) -> None:
  """Checks config.eval and config.sampler; raises ConfigError naming the field."""
  if "eval" not in config:
    raise ConfigError("config.eval is missing (see configs/eval_humaneval.py)")
  ev = config.eval
  benchmark = _get(ev, "benchmark", "config.eval")
  if benchmark not in BENCHMARKS:
    raise ConfigError(f"config.eval.benchmark={benchmark!r} is not one of {BENCHMARKS}")
  data_path = _get(ev, "data_path", "config.eval")
  if data_path and not os.path.exists(data_path):
    raise ConfigError(f"config.eval.data_path={data_path!r} does not exist")
  if benchmark.endswith("_plus") and not _data_path(ev):
    raise ConfigError(f"config.eval.data_path must name the EvalPlus JSONL for "
                      f"{benchmark!r} (evalplus has no cached copy here)")
  try:
    evalplus_score.resolve_scorer(benchmark, _optional(ev, "scorer"),
                                  _data_path(ev))
  except ValueError as e:
    raise ConfigError(f"config.eval.scorer: {e}") from None
  for name in ("min_time_limit", "gt_time_limit_factor"):
    value = _optional(ev, name)
    if not isinstance(value, (int, float)) or value <= 0:
      raise ConfigError(f"config.eval.{name}={value!r} must be positive")
  style = _get(ev, "prompt_style", "config.eval")
  if style not in PROMPT_STYLES:
    raise ConfigError(f"config.eval.prompt_style={style!r} is not one of {PROMPT_STYLES}")
  n = _get(ev, "n_samples", "config.eval")
  if not isinstance(n, int) or n < 1:
    raise ConfigError(f"config.eval.n_samples={n!r} must be a positive integer")
  ks = _get(ev, "k", "config.eval")
  if isinstance(ks, int):
    ks = (ks,)
  if not ks or any(not isinstance(k, int) or not 1 <= k <= n for k in ks):
    raise ConfigError(f"config.eval.k={ks!r} must be integers in [1, n_samples={n}]")
  for name in ("timeout_s", "memory_mb", "batch_size"):
    value = _get(ev, name, "config.eval")
    if not isinstance(value, (int, float)) or value <= 0:
      raise ConfigError(f"config.eval.{name}={value!r} must be positive")
  for name in ("workers", "limit"):
    value = _get(ev, name, "config.eval")
    if not isinstance(value, int) or value < 0:
      raise ConfigError(f"config.eval.{name}={value!r} must be >= 0 (0: automatic/all)")
  if "sampler" in config:
    validate_sampler(config.sampler)


def _data_path(ev: Any) -> str:
  """config.eval.data_path, else (EvalPlus benchmarks) evalplus's own data where present."""
  return ev.data_path or evalplus_score.default_data_path(ev.benchmark)


def run_eval(config: Any, generate_fn: GenerateFn, *, workdir: str = "",
             progress: bool = True) -> EvalReport:
  """Runs the benchmark of `config.eval` with `generate_fn` and writes its files.

  Output goes to config.eval.output_dir, or `<workdir>/eval` when that is empty.
  """
  validate(config)
  ev = config.eval
  data_path = _data_path(ev)
  all_tasks = load_benchmark(ev.benchmark, data_path)
  tasks = all_tasks[:ev.limit] if ev.limit else all_tasks
  scorer = evalplus_score.resolve_scorer(ev.benchmark, _optional(ev, "scorer"),
                                         data_path)
  evalplus = None
  if scorer == "evalplus":
    evalplus = evalplus_score.EvalPlusScorer(
        ev.benchmark, data_path,
        min_time_limit=float(_optional(ev, "min_time_limit")),
        gt_time_limit_factor=float(_optional(ev, "gt_time_limit_factor")),
        workers=ev.workers)
  output_dir = ev.output_dir or (os.path.join(workdir, "eval") if workdir else "")
  host0 = _process_index() == 0
  if not host0:  # on a pod every host scores the same samples; process 0 writes and prints
    output_dir = ""
  ks = (ev.k,) if isinstance(ev.k, int) else tuple(ev.k)
  sandbox = SandboxConfig(timeout_s=float(ev.timeout_s), memory_mb=int(ev.memory_mb),
                          workers=ev.workers or None)
  report = evaluate(tasks, generate_fn, n_samples=ev.n_samples, ks=ks,
                    prompt_style=ev.prompt_style, benchmark=ev.benchmark,
                    output_dir=output_dir or None, sandbox=sandbox,
                    batch_size=int(ev.batch_size), progress=progress and host0,
                    scorer=scorer, evalplus=evalplus, n_tasks_total=len(all_tasks))
  if output_dir and "sampler" in config:
    with open(report.paths["summary"], "w", encoding="utf-8") as f:
      json.dump({**report.summary(), "sampler": dict(config.sampler),
                 "hf_dir": config.get("hf_dir", ""),
                 "checkpoint_dir": config.get("checkpoint_dir", "")}, f, indent=2)
  if host0:
    print(report.table())
  return report


def _process_index() -> int:
  """0 without jax imported (the harness alone does not need it)."""
  jax = sys.modules.get("jax")
  return jax.process_index() if jax is not None else 0
