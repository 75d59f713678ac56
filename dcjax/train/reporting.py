"""Host-side metrics: one step's numbers (timing, MFU, the non-finite stop), the held-out ELBO,
the progress bar and the log lines. The device is never waited on except where a step's
metrics are fetched, which the loop does one step late."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from dcjax.diffusion import losses
from dcjax.train import metrics as metrics_lib


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN/inf; nothing after the last good step is saved."""


def log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(message)


class Reporter:
  """Turns device metrics into logged numbers; `step()` raises NonFiniteLossError."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, log_every: int,
               tokens_per_step: int, flops_per_step: float, peak_flops: float,
               latest_checkpoint: Callable[[], str], hooks: Sequence[Callable] = (),
               writer_options: dict | None = None):
    """`writer_options`: MetricWriter's keyword arguments (hparams, wandb, sync)."""
    host0 = jax.process_index() == 0
    self.writer = metrics_lib.MetricWriter(workdir, enabled=host0, start_step=start_step,
                                           **(writer_options or {}))
    if self.writer.dropped:
      log(f"metrics.jsonl: dropped {self.writer.dropped} records of the steps after "
          f"{start_step}, which this run redoes")
    self.bar = tqdm(total=total_steps, initial=start_step, disable=not host0, desc="train",
                    dynamic_ncols=True, leave=False, mininterval=1.0)
    self.total_steps, self.log_every, self.hooks = total_steps, log_every, list(hooks)
    self.tokens_per_step, self.flops_per_step, self.peak = (tokens_per_step, flops_per_step,
                                                            peak_flops)
    self.latest_checkpoint = latest_checkpoint
    self.last_metrics: dict | None = None
    self.eval_metrics: dict | None = None
    self._last_time = time.perf_counter()

  def restart_clock(self) -> None:
    """Time spent outside steps (evaluation, checkpoints) is not step time."""
    self._last_time = time.perf_counter()

  def step(self, step: int, device_metrics, data_time: float) -> dict:
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    dt, self._last_time = now - self._last_time, now
    m.update(step_time=dt, data_time=data_time, tokens_per_s=self.tokens_per_step / dt,
             mfu=self.flops_per_step / dt / self.peak)
    if m.pop("nonfinite"):
      raise NonFiniteLossError(
          f"non-finite loss at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
          f"stopping without saving. Only states with a finite loss and gradient are saved; "
          f"the latest checkpoint is {self.latest_checkpoint()}. Lower config.train.lr or "
          f"check the data before resuming.")
    self.last_metrics = m
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.3f}", refresh=False)
    if step % self.log_every == 0 or step == self.total_steps:
      self.writer.write(step, m)
      log(f"step {step:5d} | loss {m['loss']:.4f} | ce {m['ce_masked']:.3f} | acc "
          f"{m['accuracy']:.3f} | grad {m['grad_norm']:.3f} | lr {m['lr']:.2e} | "
          f"{m['tokens_per_s']:,.0f} tok/s | {m['step_time'] * 1e3:.0f} ms | "
          f"MFU {100 * m['mfu']:.1f}%")
    for hook in self.hooks:
      hook(step, m)
    return m

  def evaluation(self, step: int, metrics: dict) -> None:
    self.eval_metrics = metrics
    self.writer.write(step, metrics, prefix="eval")
    log(f"step {step:5d} | held-out loss {metrics['loss_token_mean']:.4f} | ce "
        f"{metrics['ce_masked']:.3f} | ELBO/token {metrics['elbo_per_token']:.4f} | acc "
        f"{metrics['accuracy']:.3f}")
    self.restart_clock()

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def held_out(eval_fn, eval_set, params, mesh, seed: int) -> dict | None:
  """Held-out masked-diffusion metrics over the fixed eval batches (fixed masks per batch)."""
  if not eval_set:
    return None
  sums = losses.zero_sums()
  with jax.set_mesh(mesh):
    for i, batch in enumerate(eval_set):
      out = eval_fn(params, batch, jax.random.fold_in(jax.random.key(seed + 1), i))
      sums = {k: sums[k] + out[k] for k in sums}
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  summary = losses.summarise(sums, max(sums["targets"], 1.0))
  return {k: float(np.asarray(v)) for k, v in summary.items()}
