"""Attention kernels' memory (and, on a GPU, time): one DiffuCoder-7B decoder layer, forward and
backward, per implementation and sequence length (docs/attention.md).

  python benchmarks/attention.py                         # AOT compiles for one v5p chip
  python benchmarks/attention.py --lengths=1024,4096 --topology=v6e-8

1. On any host (libtpu from the test extra): the layer's gradient program compiled for one chip
   of --topology with `xla`, `blockwise` and `splash` attention at each length; its peak bytes
   per chip from XLA's memory analysis (arguments + outputs + temporaries), or the
   RESOURCE_EXHAUSTED figure when the program cannot fit.
2. When this process sees a GPU: the same layer run on it with `xla`, `blockwise` and `cudnn`,
   milliseconds per forward + backward and compiled temporaries, side by side.
One row per chip, bf16 compute, the 7B layer's shapes (28 query / 4 kv heads of 128, hidden
3584, MLP 18944); a 1024-token vocabulary so the layer, not the LM head, is measured. Ends with
one line of JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax import model as model_lib
from dcjax.parallel import topology

GIB = 2 ** 30
LAYER = model_lib.ModelConfig(
    vocab_size=1024, hidden_size=3584, intermediate_size=18944, num_layers=1, num_heads=28,
    num_kv_heads=4, head_dim=128, max_position_embeddings=131072, dtype="bfloat16",
    param_dtype="bfloat16", remat_policy="full", logits_chunk=0, mask_token_id=1023)


def layer_grad(config):
  """grad of a scalar of one layer's output w.r.t. its parameters, for [B, L] tokens."""
  def loss(params, tokens):
    hidden = model_lib.hidden(config, params, tokens, model_lib.masks.Segments(
        jnp.ones_like(tokens), jnp.ones_like(tokens)))
    return jnp.mean(hidden.astype(jnp.float32) ** 2)
  return jax.grad(loss)


def _abstract(config, device, length):
  sharding = jax.sharding.SingleDeviceSharding(device)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        nn.meta.unbox(model_lib.abstract_params(config)))
  return params, jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=sharding)


def tpu_memory(impl: str, length: int, device) -> dict:
  config = dataclasses.replace(LAYER, attention_impl=impl)
  start = time.perf_counter()
  try:
    compiled = jax.jit(layer_grad(config)).lower(*_abstract(config, device, length)).compile()
  except Exception as e:  # the program cannot fit: XLA names the bytes it needed
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    found = re.search(r"([\d.]+)([GM])", str(e).split("RESOURCE_EXHAUSTED", 1)[1])
    gib = (float(found.group(1)) / (1 if found.group(2) == "G" else 1024)) if found else None
    return dict(fits=False, needed_gib=gib, compile_s=time.perf_counter() - start)
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return dict(fits=True, peak_gib=peak / GIB, temp_gib=m.temp_size_in_bytes / GIB,
              compile_s=time.perf_counter() - start)


def gpu_timing(impl: str, length: int, repeats: int) -> dict:
  config = dataclasses.replace(LAYER, attention_impl=impl)
  params = model_lib.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, length), 0, 1023)
  fn = jax.jit(layer_grad(config))
  try:
    compiled = fn.lower(params, tokens).compile()
    jax.block_until_ready(compiled(params, tokens))
  except Exception as e:  # e.g. cuDNN refusing a shape, or out of memory
    return dict(error=str(e).splitlines()[0][:200])
  start = time.perf_counter()
  for _ in range(repeats):
    out = compiled(params, tokens)
  jax.block_until_ready(out)
  return dict(ms=1000 * (time.perf_counter() - start) / repeats,
              temp_gib=compiled.memory_analysis().temp_size_in_bytes / GIB)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  parser.add_argument("--topology", default="v5p-8")
  parser.add_argument("--impls", default="xla,blockwise,splash")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  tpu_slice = topology.parse(args.topology)
  device = topology.devices(tpu_slice)[0]
  result = dict(topology=args.topology, hbm_gib_per_chip=tpu_slice.hbm_bytes / GIB, tpu={},
                gpu=None)
  print(f"one DiffuCoder-7B layer, forward + backward, 1 row, on one {args.topology} chip "
        f"({tpu_slice.hbm_bytes / GIB:.0f} GiB): peak GiB per chip")
  print(f"{'L':>6} " + " ".join(f"{impl:>12}" for impl in args.impls.split(",")))
  for length in lengths:
    row = {impl: tpu_memory(impl, length, device) for impl in args.impls.split(",")}
    result["tpu"][length] = row
    cells = [f"{r['peak_gib']:12.2f}" if r["fits"]
             else f"{'> HBM':>12}" if r["needed_gib"] is None
             else f"{'>' + format(r['needed_gib'], '.0f'):>12}" for r in row.values()]
    print(f"{length:>6} " + " ".join(cells), flush=True)

  if jax.default_backend() == "gpu":
    result["gpu"] = dict(device=jax.devices()[0].device_kind, rows={})
    print(f"\n{jax.devices()[0].device_kind}: ms per forward + backward (temporaries GiB)")
    for length in lengths:
      row = {impl: gpu_timing(impl, length, args.repeats)
             for impl in ("xla", "blockwise", "cudnn")}
      result["gpu"]["rows"][length] = row
      print(f"{length:>6} " + " ".join(
          f"{impl} {r['ms']:.1f} ms ({r['temp_gib']:.2f})" if "ms" in r else f"{impl} error"
          for impl, r in row.items()), flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
