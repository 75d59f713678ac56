"""Sampler benchmark: the jitted `generate` against a straightforward decoder, and what
threshold decoding and the block KV caches buy.

  python benchmarks/sampler.py                  # tiny model on the CPU, a few minutes
  python benchmarks/sampler.py --preset=small   # 3.3M params: compute-bound on a CPU
  python benchmarks/sampler.py --preset=0.5b    # ~0.5B params (for an accelerator)

One run, one model, one batch:
  0. each confidence algorithm (entropy, maskgit_plus, topk_margin; greedy, steps = N) of
     `generate` against a torch port of Dream's loop (tests/dream_reference.py) running
     transformers' Qwen2 on the same weights (exported with `save_pretrained`): wall time,
     the ratio, and whether the tokens are identical;
  1. tokens/s of `generate` (entropy, one token per step) against the reference decoder: a
     Python loop with one jitted model call per step and the selection in numpy on the host
     (docs/sampler.md written plainly);
  2. for threshold decoding (tau = --threshold) and each cache mode, forward passes per
     generated token (per row) and the wall-time speedup over plain 1-token-per-step
     decoding with the same blocks.
The random model's LM head is scaled by --head_scale so that its distributions are peaked
enough for threshold decoding to reveal several tokens per step (a random model at the
usual init is near-uniform and never crosses 0.9). Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from dcjax.diffusion.sampler import generate
from dcjax.diffusion.schedule import dream_reveal_counts
from dcjax.model import ModelConfig, apply, init_params

PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16),
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=4,
                num_heads=8, num_kv_heads=2, head_dim=32),
    "0.5b": dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_layers=24,
                 num_heads=16, num_kv_heads=4, head_dim=64, dtype="bfloat16"),
}


def reference_decode(config, params, ids, keep, max_new_tokens):
  """Dream's entropy sampler with steps = N, greedy, as a plain loop (host selection)."""
  b, p = ids.shape
  mask_id = config.mask_token_id
  x = np.concatenate([ids, np.full((b, max_new_tokens), mask_id, np.int32)], axis=1)
  keep = np.concatenate([keep, np.ones((b, max_new_tokens), bool)], axis=1)
  forward = jax.jit(lambda prm, tokens, k: apply(config, prm, tokens, k))
  counts = dream_reveal_counts(max_new_tokens, max_new_tokens)
  for k in counts:
    logits = np.asarray(forward(params, x, keep), np.float32)
    logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    logits[..., mask_id] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    entropy = np.sum(probs * np.log(probs + 1e-10), axis=-1)
    masked = x == mask_id
    confidence = np.where(masked, entropy, -np.inf)
    for row in range(b):
      chosen = np.argsort(-confidence[row], kind="stable")[:k]
      x[row, chosen] = probs[row, chosen].argmax(axis=-1)
  return x


def algorithm_table(config, params, ids, keep, n, repeats) -> dict:
  """Part 0: each algorithm of `generate` against the torch port of Dream's loop."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Qwen2ForCausalLM  # pylint: disable=import-outside-toplevel
  from dcjax.model import hf  # pylint: disable=import-outside-toplevel
  from tests.dream_reference import dream_generate  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  with tempfile.TemporaryDirectory() as path:
    hf.save_pretrained(config, params, path)
    model = Qwen2ForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()

  def torch_forward(tokens, pair, positions):
    mask = torch.where(torch.as_tensor(pair)[:, None], 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
      return model(torch.as_tensor(tokens, dtype=torch.long), attention_mask=mask,
                   position_ids=torch.as_tensor(positions, dtype=torch.long)).logits

  table = {}
  for alg in ("entropy", "maskgit_plus", "topk_margin"):
    fns = {"dcjax": lambda alg=alg: generate(config, params, ids, keep, max_new_tokens=n,
                                             steps=n, alg=alg).tokens,
           "torch": lambda alg=alg: dream_generate(torch_forward, ids, keep,
                                                   mask_id=config.mask_token_id,
                                                   max_new_tokens=n, steps=n, alg=alg)[0]}
    seconds, outs = timed_round_robin(fns, repeats)
    same = float(np.mean(np.asarray(outs["dcjax"]) == np.asarray(outs["torch"])))
    table[alg] = dict(dcjax_ms=1e3 * seconds["dcjax"], torch_ms=1e3 * seconds["torch"],
                      dcjax_over_torch=seconds["torch"] / seconds["dcjax"], tokens_equal=same)
    print(f"{alg:>13}: dcjax {table[alg]['dcjax_ms']:7.1f} ms, torch Dream loop "
          f"{table[alg]['torch_ms']:7.1f} ms: {table[alg]['dcjax_over_torch']:.2f}x "
          f"(tokens equal: {same:.3f})", flush=True)
  return table


def timed_round_robin(fns: dict, repeats: int) -> tuple[dict, dict]:
  """Best wall seconds per function and its last result, after one warm-up (compile) call
  each; the functions take turns in every round so a busy machine slows them alike."""
  results = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}
  best = {name: float("inf") for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      results[name] = jax.block_until_ready(fn())
      best[name] = min(best[name], time.perf_counter() - start)
  return best, results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--block_length", type=int, default=16)
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument("--head_scale", type=float, default=25.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_reference", action="store_true")
  args = parser.parse_args()

  config = ModelConfig(**PRESETS[args.preset], rope_theta=10_000.0, mask_token_id=3,
                       pad_token_id=0)
  params = init_params(config, jax.random.key(0))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * args.head_scale
  n, b = args.max_new_tokens, args.batch
  rng = np.random.RandomState(0)
  ids = rng.randint(4, config.vocab_size, (b, args.prompt_len)).astype(np.int32)
  keep = np.ones_like(ids, bool)
  keep[1::2, : args.prompt_len // 4] = False  # some left padding
  ids[~keep] = 0
  device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
  print(f"device {device}; model {PRESETS[args.preset]} ({config.num_params() / 1e6:.1f}M "
        f"params); batch {b}, prompt {args.prompt_len}, new tokens {n}")

  if not args.skip_reference:
    print(f"per algorithm, greedy, {n} steps for {n} tokens, against Dream's loop in torch:")
    algorithms = algorithm_table(config, params, ids, keep, n, args.repeats)

  def sample(**kwargs):
    return lambda: generate(config, params, ids, keep, max_new_tokens=n, alg="entropy",
                            **kwargs)

  figures = {"device": device, "preset": args.preset, "params_m": config.num_params() / 1e6,
             "batch": b, "prompt_len": args.prompt_len, "max_new_tokens": n}
  if not args.skip_reference:
    figures["algorithms"] = algorithms

  bl = args.block_length
  variants = {
      "dream": dict(steps=n),
      "blocks": dict(steps=n, block_length=bl),
      "threshold": dict(steps=n, block_length=bl, threshold=args.threshold),
      "prefix": dict(steps=n, block_length=bl, cache="prefix"),
      "dual": dict(steps=n, block_length=bl, cache="dual"),
      "threshold+prefix": dict(steps=n, block_length=bl, threshold=args.threshold,
                               cache="prefix"),
      "threshold+dual": dict(steps=n, block_length=bl, threshold=args.threshold, cache="dual"),
  }
  fns = {name: sample(**kwargs) for name, kwargs in variants.items()}
  if not args.skip_reference:
    fns["reference"] = lambda: reference_decode(config, params, ids, keep, n)
  seconds, outs = timed_round_robin(fns, args.repeats)

  figures["generate_tok_s"] = b * n / seconds["dream"]
  if not args.skip_reference:
    figures["reference_tok_s"] = b * n / seconds["reference"]
    figures["speedup_vs_reference"] = seconds["reference"] / seconds["dream"]
    figures["reference_token_match"] = float(
        np.mean(np.asarray(outs["dream"].tokens) == outs["reference"]))
    print(f"generate {figures['generate_tok_s']:.1f} tok/s vs reference decoder "
          f"{figures['reference_tok_s']:.1f} tok/s: {figures['speedup_vs_reference']:.2f}x "
          f"(tokens equal: {figures['reference_token_match']:.3f})")

  base = outs["blocks"]
  figures["blocks_tok_s"] = b * n / seconds["blocks"]
  print(f"baseline: blocks of {bl}, 1 token per step: {figures['blocks_tok_s']:.1f} tok/s, "
        f"{int(base.num_steps) / n:.2f} forwards per token")
  for name in ("threshold", "prefix", "dual", "threshold+prefix", "threshold+dual"):
    o = outs[name]
    figures[f"{name}_forwards_per_token"] = int(o.num_steps) / n
    figures[f"{name}_full_forwards_per_token"] = int(o.num_full_forwards) / n
    figures[f"{name}_speedup"] = seconds["blocks"] / seconds[name]
    figures[f"{name}_tok_s"] = b * n / seconds[name]
    figures[f"{name}_token_match"] = float(np.mean(np.asarray(o.tokens) ==
                                                   np.asarray(base.tokens)))
    print(f"{name:>17}: {figures[f'{name}_forwards_per_token']:.3f} forwards/token "
          f"({figures[f'{name}_full_forwards_per_token']:.3f} full-canvas), "
          f"{figures[f'{name}_speedup']:.2f}x faster, "
          f"tokens equal to baseline {figures[f'{name}_token_match']:.3f}")
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
