"""The coupled-GRPO policy update of dcjax against the release's three-pass loss in PyTorch.

  python benchmarks/grpo_learner.py                  # tiny and small on the CPU
  python benchmarks/grpo_learner.py --models=tiny --group=16 --completion=128

One policy update on the same batch shape for both (fp32, mu = 1, beta = 0.01 with given
reference log-probs, eps 0.5, clip 0.2 + AdamW), both with every position visible as the
release scores (dcjax: `rl.logp_attention_mask=False`):

  dcjax  `Learner.update` (docs/grpo.md): three forward passes of [B, L] (all completion
         tokens masked; u < t; u >= t), the LM head chunked over the completion, the k3/PPO
         token-mean loss, gradient, clip and AdamW, jitted with the state donated.
  torch  transformers' Qwen2 with a non-causal mask, the release's layout: the three noisy
         copies stacked into one [3B, L] batch, one forward, fp32 log-softmax of the
         completion logits, `0.5 * (lp_full + (u < t ? lp_t / t : lp_t_hat / (1 - t)))`,
         the same loss, backward, clip_grad_norm_ and torch AdamW.

Also times the scoring pass (the same estimate without gradient, what the old-policy and
reference log-probs cost). MFU = model FLOPs (3 passes x (6N + attention) per token for the
update, 2N + attention for scoring) / the matmul peak measured in this process. Ends with one
JSON line: ms per update and per scoring call for each, and the dcjax/torch ratios with
each round's paired ratio (printed as their range).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Both libraries run in this process under the same malloc settings (dcjax/host_malloc.py;
# DCJAX_HOST_MALLOC=0 keeps glibc's defaults).
from dcjax import host_malloc  # noqa: E402
host_malloc.tune()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.train_step import (Local, Remote, model_config, round_ratios,  # noqa: E402
                                    spread, timed, torch_model)
from dcjax import model as model_lib  # noqa: E402
from dcjax.config import base_config  # noqa: E402
from dcjax.model.config import ModelConfig  # noqa: E402
from dcjax.rl import grpo_config, learner as learner_lib, logprobs  # noqa: E402
from dcjax.rl.loss import PolicyLossConfig  # noqa: E402
from dcjax.train import metrics, optim  # noqa: E402

LOSS = PolicyLossConfig(epsilon_low=0.5, epsilon_high=0.5, beta=0.01)


def make_batch(mc: ModelConfig, group: int, prompt: int, completion: int, seed: int = 0):
  """Random tokens, a completion mask with ragged ends, advantages and reference log-probs."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, mc.vocab_size, (group, prompt + completion)).astype(np.int32)
  lengths = rng.integers(completion // 2, completion + 1, group)
  mask = (np.arange(completion)[None] < lengths[:, None])
  adv = rng.standard_normal(group).astype(np.float32)
  ref = (-3.0 + 0.1 * rng.standard_normal((group, completion))).astype(np.float32)
  return dict(tokens_BxL=tokens, completion_mask_BxN=mask, advantages_B=adv, ref_logp_BxN=ref)


def dcjax_runners(mc: ModelConfig, batch: dict):
  section = grpo_config.add_grpo_sections(base_config()).optim
  section.update(lr=1e-6, grad_clip=0.2)
  tx, schedule = optim.make_optimizer(section, 1000)
  estimator = logprobs.EstimatorConfig("coupled", attention_mask=False)
  lrn = learner_lib.Learner(mc, learner_lib.LearnerConfig(estimator=estimator, loss=LOSS), tx,
                            schedule, mask_id=mc.mask_token_id)
  params = model_lib.init_params(mc, jax.random.key(0))
  holder = {"state": lrn.init_state(params, seed=0)}
  device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  key = jax.random.key(1)

  def update():
    holder["state"], m = lrn.update(holder["state"], device_batch, key)
    jax.block_until_ready(m)

  def score():
    jax.block_until_ready(lrn.score(holder["state"].params, device_batch, key))

  return {"update": update, "score": score}


def torch_runners(mc: ModelConfig, batch: dict):
  import torch  # pylint: disable=import-outside-toplevel
  b, n = batch["completion_mask_BxN"].shape
  l = batch["tokens_BxL"].shape[1]
  model = torch_model(mc, l)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.1)
  tokens = torch.from_numpy(batch["tokens_BxL"]).long()
  mask = torch.from_numpy(batch["completion_mask_BxN"]).float()
  adv = torch.from_numpy(batch["advantages_B"])[:, None]
  ref = torch.from_numpy(batch["ref_logp_BxN"])
  visible = torch.zeros(3 * b, 1, l, l)  # additive, all visible: bidirectional
  gen = torch.Generator().manual_seed(0)

  def estimate():
    t = 0.2 + 0.6 * torch.rand(b, 1, generator=gen)
    u = torch.rand(b, n, generator=gen)
    below = u < t
    completion = tokens[:, -n:]
    masks = [torch.ones_like(below), below, ~below]
    noisy = torch.cat([torch.cat([tokens[:, :-n], torch.where(m, mc.mask_token_id, completion)],
                                 dim=1) for m in masks])
    logits = model(noisy, attention_mask=visible).logits[:, l - n - 1:l - 1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, completion.repeat(3, 1)[..., None])[..., 0]
    full, lp_t, lp_hat = lp[:b], lp[b:2 * b], lp[2 * b:]
    return 0.5 * (full + torch.where(below, lp_t / t, lp_hat / (1 - t)))

  def update():
    opt.zero_grad(set_to_none=True)
    logp = estimate()
    ratio = torch.exp(logp - logp.detach())
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.5, 1.5) * adv)
    delta = ref - logp
    per_token = per_token + LOSS.beta * (torch.exp(delta) - delta - 1)
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
    opt.step()

  def score():
    with torch.no_grad():
      estimate()

  return {"update": update, "score": score}


def torch_grpo_runners(fields: dict, batch: dict) -> dict:
  """{"torch update", "torch score"} (a `benchmarks.train_step.Remote` factory: a process
  of its own, as there)."""
  return {f"torch {k}": v for k, v in torch_runners(ModelConfig.from_dict(fields), batch).items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,small")
  parser.add_argument("--group", default="16,4", help="completions per batch, per model")
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--completion", type=int, default=64)
  parser.add_argument("--steps", type=int, default=0,
                      help="timed calls per block (2 rounds); 0: about 1.5 s of calls, 2-25")
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args(argv)
  names = args.models.split(",")
  groups = [int(x) for x in args.group.split(",")]
  groups += [groups[-1]] * (len(names) - len(groups))
  metrics.measure_matmul_peak.cache_clear()
  peaks = [metrics.peak_flops(cpu_dtype=np.dtype("float32"))]
  device = jax.devices()[0]
  results = {"device": f"{device.platform}:{device.device_kind} x {jax.device_count()}"}
  rows = {}
  for name, group in zip(names, groups):
    mc = model_config(name, "float32", "none")
    batch = make_batch(mc, group, args.prompt, args.completion)
    local = Local({f"dcjax {k}": v for k, v in dcjax_runners(mc, batch).items()})
    remote = None if args.no_torch else Remote(torch_grpo_runners, mc.to_dict(), batch)
    try:  # dcjax and torch take turns in blocks (benchmarks/train_step.py, `timed`)
      times, per_round = timed([(r, f"{impl} {k}") for k in ("update", "score")
                     for impl, r in (("dcjax", local), ("torch", remote)) if r is not None],
                    args.steps, rounds=3)
    finally:
      if remote:
        remote.close()
    rows[name] = (mc, group, times, per_round)
    metrics.measure_matmul_peak.cache_clear()
    peaks.append(metrics.peak_flops(cpu_dtype=np.dtype("float32")))
  peak, peak_source = max(peaks)
  print(f"device: {results['device']}; peak {peak:.3e} FLOP/s ({peak_source})")
  results.update(peak_flops=peak, peak_source=peak_source)
  l = args.prompt + args.completion
  for name, (mc, group, times, per_round) in rows.items():
    tokens = 3 * group * l  # three passes
    train_flops = metrics.train_flops_per_token(mc, l) * tokens
    score_flops = train_flops / 3
    row = {"params": mc.num_params(), "group": group, "seq_len": l}
    line = f"{name:>5}: {mc.num_params() / 1e6:6.1f}M params, {group} x {l} tokens, 3 passes"
    for impl in ("dcjax", "torch"):
      if f"{impl} update" not in times:
        continue
      up, sc = times[f"{impl} update"], times[f"{impl} score"]
      row.update({f"{impl}_update_s": up, f"{impl}_score_s": sc,
                  f"{impl}_update_mfu": train_flops / up / peak,
                  f"{impl}_score_mfu": score_flops / sc / peak})
      line += (f"\n       {impl:>5}: update {up * 1e3:8.1f} ms (MFU {100 * train_flops / up / peak:4.1f}%)"
               f" | score {sc * 1e3:8.1f} ms (MFU {100 * score_flops / sc / peak:4.1f}%)")
    if "torch update" in times:
      row["update_dcjax_over_torch"] = times["torch update"] / times["dcjax update"]
      row["score_dcjax_over_torch"] = times["torch score"] / times["dcjax score"]
      for k in ("update", "score"):
        row[f"{k}_dcjax_over_torch_rounds"] = round_ratios(per_round, f"torch {k}", f"dcjax {k}")
      line += (f"\n       dcjax/torch: update {row['update_dcjax_over_torch']:.2f}x "
               f"({spread(row['update_dcjax_over_torch_rounds'])}), "
               f"score {row['score_dcjax_over_torch']:.2f}x "
               f"({spread(row['score_dcjax_over_torch_rounds'])})")
    print(line, flush=True)
    results[name] = row
  print(json.dumps(results))


if __name__ == "__main__":
  main()
