"""Train-step MFU of dcjax vs the same model + loss in plain PyTorch, in one command.

  python benchmarks/train_step.py                           # tiny and small on the CPU
  python benchmarks/train_step.py --models=1b --dtype=bfloat16 --batch=8 --seq_len=2048 \
      --no_torch                                            # a lent GPU / TPU

For each model: the full dcjax train step (masked-diffusion loss with the shift and 1/t,
AdamW, clipping; jitted, donated) and, unless --no_torch, `transformers` Qwen2ForCausalLM
with a non-causal 4-D mask running the same loss and AdamW, both fp32 on the CPU; torch runs
in a process of its own started by this command, with the same malloc settings, and the two
take turns in blocks of about 1.5 s of steps (three rounds), so a change in the machine's
load during the run reaches both. MFU =
model FLOP/s (6N + bidirectional attention, dcjax.train.metrics) / peak, where the peak is
a matmul measured in this process on the CPU, or the chip's data-sheet bf16 peak. Then, per
model, the phases timed alone for both (unless --no_phases): forward (the loss), backward
(loss + gradient minus forward) and the optimiser (clip + AdamW on fixed gradients). Prints a
table, then one JSON line with every figure and the dcjax/torch throughput ratios; beside
each ratio, the range of the per-round ratios (each round's dcjax and torch blocks ran next
to each other), the run's own spread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Both libraries run in this process under the same malloc settings (dcjax/host_malloc.py;
# DCJAX_HOST_MALLOC=0 keeps glibc's defaults).
from dcjax import host_malloc  # noqa: E402
host_malloc.tune()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from dcjax.data import pipeline  # noqa: E402
from dcjax.diffusion import losses  # noqa: E402
from dcjax.model.config import ModelConfig  # noqa: E402
from dcjax.parallel import mesh as mesh_lib  # noqa: E402
from dcjax import model as model_lib  # noqa: E402
from dcjax.train import metrics, optim  # noqa: E402
from dcjax.train import state as state_lib  # noqa: E402
from dcjax.train import step as step_lib  # noqa: E402
from dcjax.train.train_config import add_train_sections  # noqa: E402
from dcjax.config import base_config  # noqa: E402

ONE_B = dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_layers=16,
             num_heads=16, num_kv_heads=4, head_dim=128, rope_theta=10_000.0,
             mask_token_id=4, pad_token_id=1, eos_token_id=1)


def model_config(name: str, dtype: str, remat: str) -> ModelConfig:
  if name == "1b":
    fields = dict(ONE_B)
  else:
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    fields = module.get_config().model.to_dict()
  fields.update(dtype=dtype, param_dtype="float32", remat_policy=remat)
  return ModelConfig.from_dict(fields)


class Local:
  """Runners in this process, timed in blocks of calls (each call blocks)."""

  def __init__(self, runners: dict):
    self.runners = runners

  def block(self, name: str, calls: int) -> list:
    return _block(self.runners[name], calls)

  def close(self):
    pass


def _block(run, calls: int) -> list:
  out = []
  for _ in range(calls):
    start = time.perf_counter()
    run()
    out.append(time.perf_counter() - start)
  return out


class Remote:
  """Runners built by `factory(*args)` (a module-level function returning {name: callable})
  in a fresh process with the same malloc settings (dcjax/host_malloc.py), timed in blocks
  on request; the process waits idle between requests. In one process the two libraries'
  buffers share glibc's heap: after torch's steps, XLA's buffers fault their pages in again
  at every step (29,600 faults, +40 % on the tiny step)."""

  def __init__(self, factory, *args):
    import multiprocessing  # pylint: disable=import-outside-toplevel
    context = multiprocessing.get_context("spawn")
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
    self._process.start()
    self.names = self._receive()

  def _receive(self):
    kind, value = self._conn.recv()
    if kind == "error":
      raise RuntimeError(f"benchmark worker failed:\n{value}")
    return value

  def block(self, name: str, calls: int) -> list:
    self._conn.send((name, calls))
    return self._receive()

  def close(self):
    self._conn.send(None)
    self._process.join(timeout=60)


def _serve(conn, factory, args):
  import traceback  # pylint: disable=import-outside-toplevel
  try:
    runners = factory(*args)
    conn.send(("ok", list(runners)))
    while (request := conn.recv()) is not None:
      conn.send(("ok", _block(runners[request[0]], request[1])))
  except Exception:  # pylint: disable=broad-except
    conn.send(("error", traceback.format_exc()))


def timed(entries: list, steps: int = 0, rounds: int = 2,
          block_seconds: float = 1.5) -> tuple[dict, dict]:
  """({name: median seconds per call}, {name: [median of each round's block]}) for the
  (runners, name) entries, after one warm-up call each.

  The entries take turns in blocks of calls for `rounds` rounds, dcjax's and torch's
  interleaved in time, so a machine that grows busier or quieter during the run changes both
  alike, while each library's thread pool runs undisturbed in its block. `steps=0` sizes
  each entry's block from a timed call: about `block_seconds` of calls, 2 to 25 of them (a
  median of 4 calls of a 70 ms step wandered by 25 %). The per-round medians give paired
  ratios (`round_ratios`): the spread of one run, printed beside its ratio."""
  calls = {}
  for runners, name in entries:
    runners.block(name, 1)
    once = runners.block(name, 1)[0]
    calls[name] = steps or max(2, min(25, math.ceil(block_seconds / once)))
  times = {name: [] for _, name in entries}
  per_round = {name: [] for _, name in entries}
  for _ in range(rounds):
    for runners, name in entries:
      block = runners.block(name, calls[name])
      times[name] += block
      per_round[name].append(float(np.median(block)))
  return {name: float(np.median(t)) for name, t in times.items()}, per_round


def round_ratios(per_round: dict, slow: str, fast: str) -> list:
  """per_round[slow][r] / per_round[fast][r] for each round r: the two blocks of a round ran
  next to each other in time, so these pair the two libraries under the same load."""
  return [s / f for s, f in zip(per_round[slow], per_round[fast])]


def spread(ratios: list) -> str:
  return f"rounds {min(ratios):.2f}-{max(ratios):.2f}x"


def dcjax_phases(mc: ModelConfig, batch: int, seq_len: int) -> dict:
  """Callables for the phases of the step, each jitted alone: the loss (forward), its
  gradient (forward + backward), and clip + AdamW on given gradients (optimiser)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from dcjax.diffusion import forward_process as fp  # pylint: disable=import-outside-toplevel
  cfg = add_train_sections(base_config())
  tx, _ = optim.make_optimizer(cfg.train, cfg.train.steps)
  params = model_lib.init_params(mc, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch_ = losses.as_batch(rng.integers(8, mc.vocab_size, (batch, seq_len)).astype(np.int32))
  lcfg = losses.LossConfig()

  def loss_fn(p, key):
    prepared = losses.prepare(batch_, fp.draw_noise(key, batch, seq_len, lcfg.noise),
                              mc.mask_token_id, lcfg)
    hidden = model_lib.hidden(mc, p, prepared["noisy"], None, None,
                              wanted=losses.scored_positions(prepared))
    sums = losses.hidden_loss_sums(mc, p, hidden, prepared)
    return sums["loss_sum"] / losses.normaliser(prepared, lcfg)

  forward, grad = jax.jit(loss_fn), jax.jit(jax.grad(loss_fn))
  key = jax.random.key(1)
  grads = grad(params, key)

  def update(g, p, o):  # outputs in the donated inputs' order, so each aliases its own buffer
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o

  update = jax.jit(update, donate_argnums=(1, 2))
  holder = {"params": jax.tree.map(jnp.copy, params), "opt": tx.init(params)}

  def optimiser():
    holder["params"], holder["opt"] = update(grads, holder["params"], holder["opt"])
    jax.block_until_ready(holder["params"])

  return {"forward": lambda: jax.block_until_ready(forward(params, key)),
          "forward+backward": lambda: jax.block_until_ready(grad(params, key)),
          "optimiser": optimiser}


def dcjax_runner(mc: ModelConfig, batch: int, seq_len: int):
  """A callable running one full dcjax train step (compiled here)."""
  cfg = add_train_sections(base_config())
  tx, schedule = optim.make_optimizer(cfg.train, cfg.train.steps)
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  params = model_lib.init_params(mc, jax.random.key(0), mesh)
  abstract = state_lib.abstract_state(jax.eval_shape(lambda: params), tx)
  shardings = state_lib.state_shardings(abstract, model_lib.param_shardings(mc, mesh), tx,
                                        mesh)
  holder = {"state": state_lib.init_state(params, tx, 0, shardings)}
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(mc, losses.LossConfig(), tx, schedule), shardings,
      {k: pipeline.batch_sharding(mesh) for k in pipeline.BATCH_KEYS},
      NamedSharding(mesh, PartitionSpec()))
  rng = np.random.default_rng(0)
  local = dict(tokens=rng.integers(8, mc.vocab_size, (batch, seq_len)).astype(np.int32),
               segment_ids=np.ones((batch, seq_len), np.int32),
               positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
               prompt_mask=np.zeros((batch, seq_len), bool))
  global_batch = pipeline.to_global(local, mesh)
  with jax.set_mesh(mesh):
    compiled = fn.lower(holder["state"], global_batch).compile()

  def run():
    with jax.set_mesh(mesh):
      holder["state"], m = compiled(holder["state"], global_batch)
    jax.block_until_ready(m)

  return run


def torch_model(mc: ModelConfig, seq_len: int):
  """transformers' Qwen2ForCausalLM with dcjax's shapes (fp32, sdpa, seed 0, train mode), on
  every host core."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Qwen2Config, Qwen2ForCausalLM  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  config = Qwen2Config(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
                       intermediate_size=mc.intermediate_size, num_hidden_layers=mc.num_layers,
                       num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
                       head_dim=mc.head_dim, rope_theta=mc.rope_theta,
                       rms_norm_eps=mc.rms_norm_eps, tie_word_embeddings=False,
                       max_position_embeddings=max(seq_len, 128))
  config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  torch.manual_seed(0)
  return Qwen2ForCausalLM(config).train()


def torch_runner(mc: ModelConfig, batch: int, seq_len: int, phases: bool = False):
  """transformers Qwen2 (fp32, non-causal 4-D mask) + the same loss + torch AdamW; with
  `phases`, callables for the loss (forward), loss + backward, and clip + AdamW."""
  import torch  # pylint: disable=import-outside-toplevel
  model = torch_model(mc, seq_len)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
  gen = torch.Generator().manual_seed(0)
  tokens = torch.randint(8, mc.vocab_size, (batch, seq_len), generator=gen)
  mask = torch.zeros(batch, 1, seq_len, seq_len)  # additive, all visible: bidirectional

  def loss_fn():
    t = (1 - 1e-3) * torch.rand(batch, generator=gen) + 1e-3
    masked = torch.rand(batch, seq_len, generator=gen) < t[:, None]
    noisy = torch.where(masked, torch.full_like(tokens, mc.mask_token_id), tokens)
    logits = model(noisy, attention_mask=mask).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, mc.vocab_size),
                                           tokens[:, 1:].reshape(-1), reduction="none")
    target = masked[:, 1:].reshape(-1).float()
    weight = (1.0 / t)[:, None].expand(batch, seq_len - 1).reshape(-1)
    return (ce * weight * target).sum() / target.sum().clamp(min=1)

  def backward():
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()

  def optimiser():
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def run():
    backward()
    optimiser()

  if phases:
    backward()  # gradients for the optimiser phase
    return {"forward": loss_fn, "forward+backward": backward, "optimiser": optimiser}
  return run


def torch_runners(fields: dict, batch: int, seq_len: int, phases: bool) -> dict:
  """{"torch": step, "torch <phase>": ...} (a `Remote` factory)."""
  mc = ModelConfig.from_dict(fields)
  runners = {"torch": torch_runner(mc, batch, seq_len)}
  if phases:
    runners.update({f"torch {k}": v
                    for k, v in torch_runner(mc, batch, seq_len, phases=True).items()})
  return runners


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,small")
  parser.add_argument("--batch", default="16,4", help="per model, comma-separated")
  parser.add_argument("--seq_len", default="128,128", help="per model, comma-separated")
  parser.add_argument("--steps", type=int, default=0,
                      help="timed steps per block (2 rounds); 0: about 1.5 s of steps, 2-25")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--no_phases", action="store_true",
                      help="skip the per-phase breakdown (forward, backward, optimiser)")
  args = parser.parse_args(argv)
  names = args.models.split(",")

  def per_model(value):
    parts = [int(x) for x in value.split(",")]
    return parts + [parts[-1]] * (len(names) - len(parts))

  batches, lengths = per_model(args.batch), per_model(args.seq_len)
  device = jax.devices()[0]
  peaks = []

  def measure_peak():
    metrics.measure_matmul_peak.cache_clear()
    peaks.append(metrics.peak_flops(cpu_dtype=np.dtype(args.dtype)))

  measure_peak()
  rows, phase_times = {}, {}
  for name, batch, seq_len in zip(names, batches, lengths):
    mc = model_config(name, args.dtype, args.remat)
    local = {"dcjax": dcjax_runner(mc, batch, seq_len)}
    if not args.no_phases:
      local.update({f"dcjax {k}": v for k, v in dcjax_phases(mc, batch, seq_len).items()})
    local = Local(local)
    remote = None if args.no_torch else Remote(torch_runners, mc.to_dict(), batch, seq_len,
                                                not args.no_phases)
    try:
      # the steps first, three rounds of dcjax / torch blocks; then the phases
      times, per_round = timed(
          [(local, "dcjax")] + ([(remote, "torch")] if remote else []), args.steps, rounds=3)
      if not args.no_phases:
        phase_times[name], _ = timed(
            [(r, f"{impl} {k}") for k in ("forward", "forward+backward", "optimiser")
             for impl, r in (("dcjax", local), ("torch", remote)) if r is not None],
            args.steps)
    finally:
      if remote:
        remote.close()
    measure_peak()
    rows[name] = (mc, batch, seq_len, times, per_round)
  # The best peak seen in the run (the least loaded moment): a conservative MFU.
  peak, peak_source = max(peaks)
  print(f"device: {device.device_kind} x {jax.device_count()}; peak {peak:.3e} FLOP/s "
        f"({peak_source}; best of {len(peaks)})")
  results = {"device": f"{device.platform}:{device.device_kind} x {jax.device_count()}",
             "peak_flops": peak, "peak_source": peak_source, "dtype": args.dtype}
  for name, (mc, batch, seq_len, times, per_round) in rows.items():
    flops = metrics.train_flops_per_token(mc, seq_len) * batch * seq_len
    row = {"params": mc.num_params(), "batch": batch, "seq_len": seq_len,
           "flops_per_step": flops}
    line = f"{name:>5}: {mc.num_params() / 1e6:7.1f}M params  B={batch} L={seq_len}"
    for impl, seconds in times.items():
      row.update({f"{impl}_step_s": seconds, f"{impl}_tokens_per_s": batch * seq_len / seconds,
                  f"{impl}_mfu": flops / seconds / peak})
      line += (f" | {impl} {seconds * 1e3:8.1f} ms/step {batch * seq_len / seconds:8.0f} tok/s "
               f"MFU {100 * flops / seconds / peak:5.1f}%")
    if "torch" in times:
      row["dcjax_over_torch"] = times["torch"] / times["dcjax"]
      row["dcjax_over_torch_rounds"] = round_ratios(per_round, "torch", "dcjax")
      line += (f" | dcjax/torch {row['dcjax_over_torch']:.2f}x "
               f"({spread(row['dcjax_over_torch_rounds'])})")
    print(line, flush=True)
    if name in phase_times:
      ph = phase_times[name]
      for impl in ("dcjax", "torch"):
        if f"{impl} forward" not in ph:
          continue
        fwd, fb, opt = (ph[f"{impl} {k}"] for k in ("forward", "forward+backward", "optimiser"))
        row.update({f"{impl}_forward_s": fwd, f"{impl}_backward_s": fb - fwd,
                    f"{impl}_optimiser_s": opt})
        print(f"       {impl:>5} phases: forward {fwd * 1e3:8.1f} ms | backward "
              f"{(fb - fwd) * 1e3:8.1f} ms | clip + AdamW {opt * 1e3:8.1f} ms", flush=True)
    results[name] = row
  print(json.dumps({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                    for k, v in results.items()}))


if __name__ == "__main__":
  main()
