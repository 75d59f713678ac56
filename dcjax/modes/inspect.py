"""`mode="inspect"`: build the model on the mesh, print its parameters and shardings, run a forward pass."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from dcjax import model as model_lib
from dcjax.model.loading import load_or_init
from dcjax.parallel import mesh as mesh_lib


def describe(params) -> str:
  """One line per parameter: path, shape, dtype, PartitionSpec."""
  lines = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    spec = getattr(leaf.sharding, "spec", "")
    lines.append(f"  {name:<42} {str(tuple(leaf.shape)):<22} {str(leaf.dtype):<9} {spec}")
  return "\n".join(lines)


def run(config, workdir: str) -> None:
  del workdir
  mesh = mesh_lib.make_mesh(config.mesh)
  print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")
  model_config, params = load_or_init(config, mesh)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"parameters: {count:,} ({count / 1e6:.2f}M)")
  print(describe(params))

  b, l = config.get("inspect_batch", 2), config.get("inspect_length", 64)
  b = max(b, mesh.shape["data"] * mesh.shape["fsdp"])
  tokens = jax.random.randint(jax.random.key(config.seed + 1), (b, l), 0,
                              model_config.vocab_size)
  forward = jax.jit(lambda p, t: model_lib.apply(model_config, p, t))
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(params, tokens))
    first = time.perf_counter() - start
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(params, tokens))
    second = time.perf_counter() - start
  finite = bool(jnp.isfinite(logits.astype(jnp.float32)).all())
  print(f"forward: tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)} "
        f"{logits.dtype}, finite={finite}, compile+run {first:.2f}s, run {second * 1e3:.1f} ms")
