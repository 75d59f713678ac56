"""XLA's matmuls against torch's on the shapes of one train step, in one process.

  python benchmarks/matmul.py                      # tiny and small at the train-step batches
  python benchmarks/matmul.py --models=small --rows=1536

For every dense layer of a model (the q/k/v/o projections, the MLP's gate/up and down, the LM
head) at `rows` = batch x length tokens, the three products a train step runs: the forward
X W, the input gradient dY W^T and the weight gradient X^T dY, each as `jax.jit` of the
`dot_general` that `dcjax.model.layers.matmul` and its transpose produce, and as torch's
`matmul` on the same arrays. The two libraries take turns call by call, `--rounds` rounds of
`--calls` calls each; the median of each is printed as GFLOP/s with the jax / torch ratio.

Use it when the train-step ratio (benchmarks/train_step.py) moves between machines: the
step of the small model is mostly these products, so a CPU whose GEMM library favours one
side shows here first (docs/performance.md, "Matmuls by machine").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dcjax import host_malloc  # noqa: E402
host_malloc.tune()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks.train_step import model_config  # noqa: E402


def layer_shapes(mc) -> dict:
  """{name: (in, out)} of the model's distinct dense layers."""
  return {"q_proj / o_proj": (mc.hidden_size, mc.num_heads * mc.head_dim),
            "k_proj / v_proj": (mc.hidden_size, mc.num_kv_heads * mc.head_dim),
            "gate_proj / up_proj": (mc.hidden_size, mc.intermediate_size),
            "down_proj": (mc.intermediate_size, mc.hidden_size),
            "lm_head": (mc.hidden_size, mc.vocab_size)}


def _contract(a, b, dims):
  return lax.dot_general(a, b, ((dims[:1], dims[1:]), ((), ())))


def products(rows: int, d_in: int, d_out: int, rng) -> dict:
  """{product: (jax callable, torch callable)} on fresh float32 operands."""
  import torch  # pylint: disable=import-outside-toplevel
  x, w, dy = (rng.standard_normal(s, dtype=np.float32)
              for s in ((rows, d_in), (d_in, d_out), (rows, d_out)))
  jx, jw, jdy = (jax.device_put(a) for a in (x, w, dy))
  tx, tw, tdy = (torch.from_numpy(a) for a in (x, w, dy))
  fwd = jax.jit(lambda a, b: _contract(a, b, (1, 0)))
  d_x = jax.jit(lambda a, b: _contract(a, b, (1, 1)))  # dY W^T
  d_w = jax.jit(lambda a, b: _contract(a, b, (0, 0)))  # X^T dY
  return {"X W": (lambda: fwd(jx, jw).block_until_ready(), lambda: tx @ tw),
          "dY W^T": (lambda: d_x(jdy, jw).block_until_ready(), lambda: tdy @ tw.T),
          "X^T dY": (lambda: d_w(jx, jdy).block_until_ready(), lambda: tx.T @ tdy)}


def alternate(pair, rounds: int, calls: int) -> tuple[float, float]:
  """Median seconds per call of (jax, torch), taking turns in blocks of `calls`."""
  times = ([], [])
  for run in pair:
    run()
  for _ in range(rounds):
    for side, run in enumerate(pair):
      for _ in range(calls):
        start = time.perf_counter()
        run()
        times[side].append(time.perf_counter() - start)
  return float(np.median(times[0])), float(np.median(times[1]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,small")
  parser.add_argument("--rows", default="2048,512",
                      help="tokens per product, per model (the train step's batch x length)")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--calls", type=int, default=3)
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  names = args.models.split(",")
  rows = [int(r) for r in args.rows.split(",")]
  rows += [rows[-1]] * (len(names) - len(rows))
  rng = np.random.default_rng(0)
  results = {"device": str(jax.devices()[0].device_kind), "torch_threads": torch.get_num_threads()}
  for name, n in zip(names, rows):
    mc = model_config(name, "float32", "none")
    results[name] = {}
    for layer, (d_in, d_out) in layer_shapes(mc).items():
      flops = 2.0 * n * d_in * d_out
      cells = []
      for product, pair in products(n, d_in, d_out, rng).items():
        jax_s, torch_s = alternate(pair, args.rounds, args.calls)
        results[name][f"{layer}: {product}"] = {"jax_gflops": flops / jax_s / 1e9,
                                                "torch_gflops": flops / torch_s / 1e9}
        cells.append(f"{product} {flops / jax_s / 1e9:4.0f} / {flops / torch_s / 1e9:4.0f} "
                     f"({torch_s / jax_s:.2f}x)")
      print(f"{name:>5} {layer:>19} [{n}x{d_in}]x[{d_in}x{d_out}]  jax / torch GFLOP/s: "
            + " | ".join(cells), flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
