"""`model.hidden(..., wanted=)`: the last layer's tail on the wanted rows only
(dcjax/model/wanted.py) gives the full model's states there, zeros elsewhere, with the same
gradients, and its backward differentiates the taken branch alone."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dcjax import model as model_lib
from dcjax.model import head
from dcjax.parallel import mesh as mesh_lib
from tests.trees import assert_trees_close

TINY = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4,
                             rms_norm_eps=1e-5, mask_token_id=63, scan_layers=False)
B, L = 4, 16


def _inputs(fraction, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 63, (B, L)), jnp.int32)
  wanted = jnp.asarray(rng.random((B, L)) < fraction)
  weights = jnp.asarray(rng.standard_normal((B, L, TINY.hidden_size)), jnp.float32)
  return tokens, wanted, weights


def _value_and_grads(config, params, tokens, attention, wanted, weights, rows=None, *,
                     use_wanted):
  def loss(p):
    h = model_lib.hidden(config, p, tokens, attention, rows=rows,
                         wanted=wanted if use_wanted else None)
    h = jnp.where(wanted[..., None], h, 0.0) if not use_wanted else h
    return jnp.sum(jnp.tanh(h) * weights[:, :h.shape[1]]), h
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("policy,mask,fraction", [
    ("none", "none", 0.4), ("full", "keep", 0.6), ("none", "segments", 0.0),
    ("none", "none", 1.0)])
def test_wanted_states_equal_the_full_states_where_wanted(policy, mask, fraction):
  """Values and gradients against the full model's states zeroed where not wanted, with
  and without remat, under each mask kind, with nothing wanted (the empty branch: zero
  states) and everything wanted (the last branch); with the layer loop and with the scan
  (which computes every row and zeroes the rest)."""
  loop = dataclasses.replace(TINY, remat_policy=policy)
  params = model_lib.init_params(loop, jax.random.key(0))
  tokens, wanted, weights = _inputs(fraction)
  keep = jnp.ones((B, L), jnp.int32).at[0, :3].set(0)
  seg = jnp.asarray([[1] * 6 + [2] * 10] * B)
  attention = {"none": None, "keep": keep,
               "segments": model_lib.masks.Segments(seg, seg)}[mask]
  for config in (loop, dataclasses.replace(loop, scan_layers=True)):
    (ref, h_ref), g_ref = _value_and_grads(config, params, tokens, attention, wanted, weights,
                                           use_wanted=False)
    (out, h_out), g_out = _value_and_grads(config, params, tokens, attention, wanted, weights,
                                           use_wanted=True)
    np.testing.assert_allclose(h_out, h_ref, atol=1e-5, rtol=1e-5)
    assert not np.asarray(h_out)[~np.asarray(wanted)].any()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert_trees_close(g_out, g_ref, atol=1e-5, rtol=1e-4)  # fp32 sums in another order
    if fraction == 0.0:
      assert not np.asarray(g_out["layers"]["mlp"]["down_proj"]["kernel"]).any()


def test_wanted_with_rows_and_bfloat16():
  """`wanted` indexes the `rows` window; in bfloat16 compute the wanted path is as close to
  the float32 states and gradients as the bfloat16 full model is (relative norms of each
  leaf's error: bf16 rounds the sums over different row sets differently)."""
  bf16 = dataclasses.replace(TINY, dtype="bfloat16")
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens, wanted, weights = _inputs(0.5, seed=1)
  rows = (5, 8)
  wanted = wanted[:, :8]
  run = lambda c, use: _value_and_grads(c, params, tokens, None, wanted, weights, rows,
                                        use_wanted=use)
  (_, h_f32), g_f32 = run(TINY, False)
  (_, h_ref), g_ref = run(bf16, False)
  (_, h_out), g_out = run(bf16, True)
  assert h_out.shape == (B, 8, TINY.hidden_size) and h_out.dtype == jnp.bfloat16
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
                           / max(np.linalg.norm(np.asarray(b, np.float32)), 1e-30))
  assert rel(h_out, h_f32) <= 1.5 * rel(h_ref, h_f32) + 1e-3
  for path, ref_leaf in jax.tree_util.tree_leaves_with_path(g_ref):
    out_leaf = dict(jax.tree_util.tree_leaves_with_path(g_out))[path]
    f32_leaf = dict(jax.tree_util.tree_leaves_with_path(g_f32))[path]
    assert rel(out_leaf, f32_leaf) <= 1.5 * rel(ref_leaf, f32_leaf) + 1e-3, path


def test_wanted_sorts_within_batch_shards():
  """Under a 2 x 2 x 2 mesh the rows sort within each of the 4 batch shards; the states and
  gradients equal the unsharded ones."""
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens, wanted, weights = _inputs(0.5, seed=2)
  (ref, h_ref), g_ref = _value_and_grads(TINY, params, tokens, None, wanted, weights,
                                         use_wanted=True)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  with jax.set_mesh(mesh):
    (out, h_out), g_out = _value_and_grads(
        TINY, params, jax.device_put(tokens, batch), None, jax.device_put(wanted, batch),
        weights, use_wanted=True)
  np.testing.assert_allclose(h_out, h_ref, atol=1e-5, rtol=1e-5)
  assert_trees_close(g_out, g_ref, atol=1e-5, rtol=1e-4)


def _conds(jaxpr, found):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _conds(sub, found)
  return found


def test_the_tail_switch_returns_only_the_taken_branch():
  """The forward switch returns the tail's output and its three saved activations, not the
  union of every branch's residuals (differentiating `lax.switch` does that: 110 arrays for
  the tiny model); the backward switch runs the matmuls' transposes only (two per matmul)."""
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens, wanted, _ = _inputs(0.5)
  f = lambda p: jnp.sum(model_lib.hidden(TINY, p, tokens, wanted=wanted) ** 2)
  conds = _conds(jax.make_jaxpr(jax.grad(f))(params).jaxpr, [])
  k = head.buckets(B * L)
  switches = [e for e in conds if len(e.params["branches"]) == k + 1]
  assert len(switches) == 2
  forward, backward = switches
  assert len(forward.outvars) == 4
  dots = [sum(e.primitive.name == "dot_general" for e in b.jaxpr.eqns)
          for b in backward.params["branches"]]
  assert dots == [0] + [6] * k
