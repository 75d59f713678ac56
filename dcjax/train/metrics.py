"""Training FLOPs and MFU (bidirectional attention), device peaks, and the metric writers.

MFU = model FLOP/s / peak FLOP/s. Model FLOPs per token, forward: 2 x (matmul parameters,
lm_head included, embedding lookup excluded) + 4 x L x heads x head_dim per layer for
QK^T and AV over the *full* sequence (every query sees every key); training = 3 x forward
(rematerialisation is not counted, as usual). Peaks are dense bf16 per chip from the
vendors' data sheets; on CPU the peak is a matmul measured in the same process.
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
from typing import Callable

import jax
import jax.numpy as jnp

# device_kind substring (lower case) -> dense bf16 FLOP/s per chip. First match wins.
PEAK_FLOPS_BF16 = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v4", 275e12), ("v3", 123e12), ("v2", 45e12),
    ("h200", 989e12), ("h100", 989e12), ("gh200", 989e12), ("b200", 2250e12),
    ("a100", 312e12), ("l4", 121e12), ("a10", 125e12), ("v100", 125e12),
)


def matmul_params(model_config) -> int:
  """Parameters that take part in matmuls (per token): all layers' projections + lm_head."""
  c = model_config
  attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.hidden_size * c.intermediate_size
  return c.num_layers * (attn + mlp) + c.hidden_size * c.vocab_size


def train_flops_per_token(model_config, seq_len: int) -> float:
  """6 N + 12 x layers x L x heads x head_dim (bidirectional attention, fwd + bwd)."""
  c = model_config
  attention = 4 * seq_len * c.num_heads * c.head_dim * c.num_layers
  return 3.0 * (2.0 * matmul_params(c) + attention)


def table_peak(device) -> float | None:
  """Per-chip dense bf16 peak from the table, or None (CPU / unknown)."""
  kind = getattr(device, "device_kind", "").lower()
  if device.platform == "cpu":
    return None
  for key, peak in PEAK_FLOPS_BF16:
    if key in kind:
      return peak
  return None


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 4,
                        chain: int = 4) -> float:
  """Best FLOP/s of `chain` back-to-back [n, n] matmuls on the default device (cached)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype) / n ** 0.5

  @jax.jit
  def run(x):
    return jax.lax.fori_loop(0, chain, lambda _, y: y @ a, x)

  jax.block_until_ready(run(a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(a))
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 * chain / best


def peak_flops(devices=None, cpu_dtype=jnp.float32) -> tuple[float, str]:
  """(total peak FLOP/s of the devices, where the number came from)."""
  devices = list(devices or jax.devices())
  peak = table_peak(devices[0])
  if peak is not None:
    return peak * len(devices), f"table: {devices[0].device_kind} x {len(devices)}"
  if devices[0].platform == "cpu":
    # Host CPU devices share one thread pool: the host's measured peak is the whole budget.
    measured = measure_matmul_peak(dtype=cpu_dtype)
    return measured, f"measured {jnp.dtype(cpu_dtype).name} matmul on the host CPU"
  return float("nan"), f"unknown peak for {devices[0].device_kind}"


class MetricWriter:
  """JSONL (`metrics.jsonl`) + TensorBoard event files in the workdir, and Weights & Biases
  when `wandb.project` is set; host 0 only.

  `start_step`: the step a run starts from (a restored checkpoint's, or 0). The records of
  later steps come from a run that went on past its last checkpoint; this run redoes those
  steps, so they are dropped (and hidden in TensorBoard), and each step keeps one record.
  `hparams`: the run's config (nested dict), written as TensorBoard hparams and as the wandb
  run's config; `hparam_metric`: the tag the hparams dashboard shows beside it. `sync`: called
  after each write (a mirrored workdir's throttled push).
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None, *,
               hparams: dict | None = None, hparam_metric: str = "train/loss",
               wandb=None, sync: Callable[[], object] | None = None):
    self.enabled = enabled
    self.dropped = 0
    self._jsonl = None
    self._tb = None
    self._wandb = None
    self._sync = sync
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if start_step is not None:
        self.dropped = drop_records_after(path, start_step)
      self._jsonl = open(path, "a")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        purge = None  # TensorBoard hides the events logged at steps >= purge_step
        if start_step is not None:
          purge = start_step + 1 if start_step else 0
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
      except ImportError:
        self._tb = None
      if self._tb is not None and hparams:
        write_hparams(self._tb, hparams, hparam_metric)
      if wandb is not None and wandb.get("project"):
        self._wandb = start_wandb(wandb, workdir, hparams or {})

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step":
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(record)
    if self._sync is not None:
      self._sync()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def writer_options(config, wd, hparam_metric: str) -> dict:
  """MetricWriter's keyword arguments for a mode's run: the config as hparams (and the wandb
  run's config), config.wandb, and a throttled push of a mirrored workdir after each write."""
  from dcjax import run_config  # pylint: disable=import-outside-toplevel
  return dict(hparams=run_config.to_json_dict(config), hparam_metric=hparam_metric,
              wandb=config.get("wandb"), sync=wd.push_logs)


def hparam_values(hparams: dict) -> dict:
  """A nested config -> {"train.lr": 0.01, ...} with the scalar types TensorBoard takes."""
  from dcjax import run_config  # pylint: disable=import-outside-toplevel
  out = {}
  for key, value in run_config.flatten(hparams).items():
    if isinstance(value, (bool, int, float, str)):
      out[key] = value
    else:  # lists, None, empty sections
      out[key] = json.dumps(value)
  return out


def write_hparams(tb, hparams: dict, metric: str) -> None:
  """The config into the run's own event file (not the sub-run tensorboardX's add_hparams
  makes), so the hparams dashboard lists it beside the run's scalars."""
  from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=import-outside-toplevel
  experiment, session_start, _ = hparams_summary(hparam_values(hparams), {metric: None})
  tb.file_writer.add_summary(experiment)  # the session-end record is left out: the run goes on
  tb.file_writer.add_summary(session_start)
  tb.add_text("config", "```\n" + json.dumps(hparams, indent=2, sort_keys=True) + "\n```")


WANDB_INSTALL = "pip install -e '.[wandb]'"


def start_wandb(section, workdir: str, hparams: dict):
  """A wandb run for config.wandb (`project`, `entity`, `mode`, `name`) with its files in
  `<workdir>/wandb`. The run id is kept in `<workdir>/wandb/run_id`, so a resumed run continues
  the same wandb run; metrics are logged against their own "step" field (a resume redoes the
  steps after its checkpoint, which wandb's own step counter would refuse)."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"config.wandb.project={section.project!r} needs wandb: "
                      f"{WANDB_INSTALL}") from e
  directory = os.path.join(workdir, "wandb")
  os.makedirs(directory, exist_ok=True)
  id_file = os.path.join(directory, "run_id")
  if os.path.exists(id_file):
    with open(id_file) as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    with open(id_file, "w") as f:
      f.write(run_id + "\n")
  run = wandb.init(project=section.project, entity=section.get("entity") or None,
                   name=section.get("name") or None, mode=section.get("mode", "offline"),
                   dir=directory, id=run_id, resume="allow", config=hparams)
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  return run


def drop_records_after(path: str, step: int) -> int:
  """Rewrites a metrics.jsonl without the records of steps after `step` (all of them when
  `step` is 0: a run from scratch redoes the step-0 evaluation too); returns how many went.

  A line that is not a JSON record (a write cut short by a kill) is dropped too.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record_step = int(json.loads(line)["step"])
      except (ValueError, KeyError, TypeError):
        record_step = None
      if step > 0 and record_step is not None and record_step <= step:
        kept.append(line)
      else:
        dropped += 1
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return dropped
