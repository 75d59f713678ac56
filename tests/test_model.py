"""Model: masks and positions, sharded forward, remat, the 7B config's size and shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax import config as config_lib
from dcjax import model as model_lib
from dcjax.model.transformer import mask_and_positions
from dcjax.parallel import mesh as mesh_lib
from configs import diffucoder_7b
from tests.trees import assert_trees_close

TINY = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4)


def test_padding_positions_and_mask_follow_dream():
  tokens = jnp.zeros((2, 5), jnp.int32)
  keep = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  mask, positions = mask_and_positions(tokens, keep)
  np.testing.assert_array_equal(positions, [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
  mask = np.asarray(model_lib.masks.dense(mask))
  assert mask.shape == (2, 5, 5)
  # Real tokens see exactly the real tokens; pads see only pads (never a real token).
  assert not mask[0, 2:, :2].any() and not mask[0, :2, 2:].any()
  assert mask[0, 2:, 2:].all() and mask[1].all()
  with pytest.raises(ValueError, match=r"attention_mask has shape \(5,\)"):
    mask_and_positions(tokens, np.ones(5))


def test_fully_padded_rows_are_finite():
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
  keep = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
  logits = model_lib.apply(TINY, params, tokens, attention_mask=keep)
  assert np.isfinite(np.asarray(logits)).all()


def test_sharded_forward_equals_single_device():
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
  keep = np.ones((4, 16), bool)
  keep[1, :3] = False
  single = np.asarray(model_lib.apply(TINY, params, tokens, attention_mask=keep))
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded_params = model_lib.init_params(TINY, jax.random.key(0), mesh)
  assert sharded_params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.P(
      None, "fsdp", "tensor")
  with jax.set_mesh(mesh):
    sharded = jax.jit(lambda p, t, k: model_lib.apply(TINY, p, t, attention_mask=k))(
        sharded_params, tokens, keep)
  np.testing.assert_allclose(np.asarray(sharded), single, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_keeps_values_and_gradients(policy):
  import dataclasses
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(model_lib.apply(c, p, tokens))[..., 0])

  g0 = jax.grad(loss)(params, TINY)
  g1 = jax.grad(loss)(params, dataclasses.replace(TINY, remat_policy=policy))
  assert_trees_close(g1, g0, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_unrolled_layers_equal_the_scan(policy):
  """scan_layers=False runs the same layers on the same stacked parameters as the scan:
  logits and gradients (a padded batch, so the mask reaches every layer) agree, and without
  remat so does the KV-cache forward (collect, then a window over the cache); the parameter
  tree is the scan's."""
  import dataclasses
  scanned = dataclasses.replace(TINY, remat_policy=policy, num_layers=3)
  unrolled = dataclasses.replace(scanned, scan_layers=False)
  params = model_lib.init_params(scanned, jax.random.key(0))
  assert (jax.tree.structure(model_lib.init_params(unrolled, jax.random.key(0)))
          == jax.tree.structure(params))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  keep = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])

  @jax.jit
  def logits_and_grads(p):
    def loss(p, c):
      logits = model_lib.apply(c, p, tokens, keep)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * keep), logits
    return [jax.grad(loss, has_aux=True)(p, c) for c in (scanned, unrolled)]

  (g_scan, l_scan), (g_loop, l_loop) = logits_and_grads(params)
  assert_trees_close(g_loop, g_scan, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(l_loop, l_scan, atol=1e-5)
  if policy != "none":
    return

  @jax.jit
  def cached(p):
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    out = []
    for c in (scanned, unrolled):
      cache, _ = model_lib.forward(c, p, tokens, positions, None, collect_kv=True)
      out.append(model_lib.forward(c, p, tokens[:, 2:6] + 1, positions[:, 2:6], None,
                                   cache=cache, cache_start=2, collect_kv=True))
    return out

  (cache_scan, out_scan), (cache_loop, out_loop) = cached(params)
  assert cache_loop.k.shape == (3, 2, 8, 2, 8)
  assert_trees_close(cache_loop, cache_scan, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(out_loop, out_scan, atol=1e-5)
  with pytest.raises(ValueError, match="scan_layers"):
    dataclasses.replace(TINY, scan_layers="no").validate()


@pytest.mark.parametrize("policy", ["none", "full"])
@pytest.mark.parametrize("mask", ["none", "keep", "segments"])
def test_hidden_rows_equal_the_slice_and_the_loop_skips_the_rest(policy, mask):
  """`hidden(..., rows=(start, length))` gives the rows of the full hidden states, values and
  gradients, with and without remat and under every mask kind. With the layer loop the last
  layer computes only those rows (fewer FLOPs in the lowered program); the scan slices after
  the stack (the same FLOPs)."""
  import dataclasses
  scanned = dataclasses.replace(TINY, remat_policy=policy, num_layers=3)
  unrolled = dataclasses.replace(scanned, scan_layers=False)
  params = model_lib.init_params(scanned, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  keep = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
  attention = {"none": None, "keep": keep,
               "segments": model_lib.masks.Segments(jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]] * 2),
                                                    jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]] * 2))}[mask]
  rows = (3, 4)
  weights = jax.random.normal(jax.random.key(2), (2, 4, TINY.hidden_size))

  def loss(p, c, r):
    h = model_lib.hidden(c, p, tokens, attention, rows=r)
    h = h if r is not None else h[:, 3:7]
    return jnp.sum(jnp.tanh(h) * weights), h

  for c in (unrolled, scanned):
    (g_full, h_full), (g_rows, h_rows) = (
        jax.jit(jax.grad(loss, has_aux=True), static_argnums=(1, 2))(params, c, r)
        for r in (None, rows))
    assert h_rows.shape == (2, 4, TINY.hidden_size)
    np.testing.assert_allclose(h_rows, h_full, atol=1e-5, rtol=1e-5)
    assert_trees_close(g_rows, g_full, atol=1e-5, rtol=1e-4)  # fp32 sums in another order
    flops = [jax.jit(loss, static_argnums=(1, 2)).lower(params, c, r).cost_analysis()["flops"]
             for r in (None, rows)]
    if c is unrolled:
      assert flops[1] < 0.9 * flops[0], flops
    else:
      assert flops[1] == flops[0], flops


def test_bfloat16_compute_stays_close_to_float32():
  import dataclasses
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  f32 = np.asarray(model_lib.apply(TINY, params, tokens))
  bf16 = model_lib.apply(dataclasses.replace(TINY, dtype="bfloat16"), params, tokens)
  assert bf16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(bf16.astype(jnp.float32)) - f32).max() < 0.05 * np.abs(f32).max()


def test_diffucoder_7b_size_and_shardings():
  config = config_lib.model_config(diffucoder_7b.get_config())
  abstract = jax.tree.map(lambda b: b.unbox(), model_lib.abstract_params(config),
                          is_leaf=lambda b: hasattr(b, "unbox"))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  # Qwen2.5-7B's published size: 7.61B parameters (untied embeddings, 152064 rows).
  assert count == 7_615_616_512
  assert count == config.num_params()
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  shardings = model_lib.param_shardings(config, mesh)
  leaves = jax.tree_util.tree_leaves_with_path(shardings)
  assert len(leaves) == len(jax.tree.leaves(abstract)) == 15
  for path, s in leaves:
    assert isinstance(s, jax.sharding.NamedSharding), path
    name = jax.tree_util.keystr(path)
    if "kernel" in name or "embedding" in name:
      assert "fsdp" in s.spec, f"{name} is not sharded over fsdp: {s.spec}"


def test_model_config_validation_names_the_field():
  import dataclasses
  with pytest.raises(ValueError, match=r"config.model.num_kv_heads=3 must divide"):
    dataclasses.replace(TINY, num_kv_heads=3).validate()
  with pytest.raises(ValueError, match=r"config.model.remat_policy='sometimes'"):
    dataclasses.replace(TINY, remat_policy="sometimes").validate()
  with pytest.raises(ValueError, match=r"unknown fields \['num_layer'\]"):
    model_lib.ModelConfig.from_dict({**TINY.to_dict(), "num_layer": 2})


def test_dot_product_attention_impl_matches_xla():
  import dataclasses
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  keep = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
  xla = np.asarray(model_lib.apply(TINY, params, tokens, attention_mask=keep))
  dpa = np.asarray(model_lib.apply(dataclasses.replace(TINY, attention_impl="dot_product_attention"),
                                   params, tokens, attention_mask=keep))
  np.testing.assert_allclose(dpa[keep.astype(bool)], xla[keep.astype(bool)], atol=1e-5)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])  # splash falls back below 128 tokens
def test_memory_efficient_impls_match_xla_in_the_model(impl):
  """The whole model, loss gradients included, under a keep-mask (segments) and a dense mask."""
  import dataclasses
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  keep = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
  dense = np.array(jax.random.bernoulli(jax.random.key(2), 0.6, (2, 8, 8)))
  dense |= np.eye(8, dtype=bool)
  other = dataclasses.replace(TINY, attention_impl=impl, remat_policy="full")
  real = keep.astype(bool)
  for mask, rows in ((keep, real), (dense, np.ones_like(real))):
    def loss(p, config):
      logits = model_lib.apply(config, p, tokens, attention_mask=mask)
      return jnp.sum(jnp.where(rows[..., None], logits, 0.0) ** 2), logits
    (_, want), want_g = jax.value_and_grad(loss, has_aux=True)(params, TINY)
    (_, got), got_g = jax.value_and_grad(loss, has_aux=True)(params, other)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5)
    assert_trees_close(got_g, want_g, rtol=1e-4, atol=1e-5)
