"""Blockwise attention (dcjax/model/blockwise.py) against the plain `attend`: forward and
gradients for every mask form, GQA, ragged key blocks, W != S, bfloat16, under remat / nn.scan /
a batch-sharded mesh, and the memory it keeps for the backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.model import masks
from dcjax.model.attention import attend
from dcjax.model.blockwise import blockwise_attention


def qkv(seed, b, w, s, h, kv, dh=8, dtype=jnp.float32):
  """Random q [B, W, H, Dh], k and v [B, S, K, Dh] and an output cotangent [B, W, H, Dh]."""
  r = np.random.default_rng(seed)
  shapes = [(b, w, h, dh), (b, s, kv, dh), (b, s, kv, dh), (b, w, h, dh)]
  return [jnp.asarray(r.normal(size=shape), dtype) for shape in shapes]


def left_padded(b, l, pads):
  """Keep-mask [B, L] with pads[i] leading pads in row i."""
  return jnp.asarray([[0] * p + [1] * (l - p) for p in pads[:b]], jnp.int32)


def outputs_and_grads(fn, q, k, v, cotangent):
  """fn(q, k, v) and the gradients of <fn(q, k, v), cotangent> w.r.t. q, k, v."""
  loss = lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), cotangent)
  return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def max_relative_error(got, want):
  return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def _none(b, w, s):
  return None


def _keep(b, w, s):
  return masks.keep_segments(left_padded(b, s, [3, 0]))


def _packed(b, w, s):
  documents = jnp.asarray([[1] * 5 + [2] * 4 + [3] * (s - 9), [1] * 7 + [2] * (s - 7)])
  return masks.keep_segments(left_padded(b, s, [2, 0]) * (jnp.arange(s) < s - 1), documents)


def _dense(b, w, s):
  mask = np.random.default_rng(7).random((b, w, s)) < 0.4
  mask[0, 1] = False  # a query row with every key masked
  return jnp.asarray(mask)


def _sliced_segments(b, w, s):
  full = _packed(b, s, s)
  return masks.Segments(full.q[:, 2:2 + w], full.kv)


CASES = {  # name: (B, W, S, H, K, block_k, mask)
    "no-mask-gqa4": (2, 12, 12, 4, 1, 4, _none),
    "keep-segments-ragged": (2, 12, 12, 4, 4, 5, _keep),
    "packed-documents": (2, 13, 13, 4, 2, 4, _packed),
    "dense-fully-masked-row": (2, 13, 13, 4, 1, 4, _dense),
    "dense-w-ne-s": (2, 5, 13, 4, 4, 3, _dense),
    "segments-w-ne-s": (2, 6, 13, 4, 1, 8, _sliced_segments),
    "tiny-s-one-block": (2, 5, 5, 4, 2, 512, _dense),
    "tiny-s-ragged": (2, 5, 5, 4, 2, 2, _keep),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_attend_forward_and_gradients(name):
  b, w, s, h, kv, block_k, make_mask = CASES[name]
  q, k, v, cotangent = qkv(1, b, w, s, h, kv)
  mask = make_mask(b, w, s)
  got, got_grads = outputs_and_grads(
      lambda q, k, v: blockwise_attention(q, k, v, mask, block_k=block_k), q, k, v, cotangent)
  want, want_grads = outputs_and_grads(
      lambda q, k, v: attend(q, k, v, masks.dense(mask)), q, k, v, cotangent)
  assert got.shape == (b, w, h, 8) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # every row, pads included
  for what, g, g_want in zip("qkv", got_grads, want_grads):
    assert g.shape == g_want.shape and g.dtype == g_want.dtype
    assert max_relative_error(g, g_want) < 1e-5, what


def test_fully_masked_row_is_uniform_over_all_keys():
  q, k, v, _ = qkv(2, 2, 13, 13, 4, 1)
  mask = _dense(2, 13, 13)
  out = blockwise_attention(q, k, v, mask, block_k=4)  # 13 keys: blocks 4, 4, 4, then 1 fresh
  np.testing.assert_allclose(out[0, 1], jnp.broadcast_to(v[0, :, 0].mean(0), (4, 8)), atol=1e-6)


def test_segments_agree_with_the_dense_keep_mask_on_real_tokens():
  """Segment pads see pads while the dense keep-mask gives pad rows uniform attention: the forms
  differ on pad rows only, so real queries' outputs and all input gradients through them agree."""
  keep = left_padded(2, 12, [4, 1])
  dense = (keep[:, :, None] * keep[:, None, :]).astype(bool)
  q, k, v, cotangent = qkv(3, 2, 12, 12, 4, 2)
  cotangent = cotangent * keep[:, :, None, None]  # only real queries' outputs enter the loss
  got, got_grads = outputs_and_grads(
      lambda q, k, v: blockwise_attention(q, k, v, masks.keep_segments(keep), block_k=5),
      q, k, v, cotangent)
  want, want_grads = outputs_and_grads(lambda q, k, v: attend(q, k, v, dense), q, k, v, cotangent)
  real = keep.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
  assert not np.allclose(got[~real], want[~real], atol=1e-3)  # the pad rows do differ
  for g, g_want in zip(got_grads, want_grads):
    assert max_relative_error(g, g_want) < 1e-5


def test_bfloat16_is_close_to_attend_in_bfloat16():
  q, k, v, cotangent = qkv(4, 2, 16, 16, 4, 2, dtype=jnp.bfloat16)
  mask = _packed(2, 16, 16)
  got, got_grads = outputs_and_grads(
      lambda q, k, v: blockwise_attention(q, k, v, mask, block_k=8), q, k, v,
      cotangent.astype(jnp.float32))
  want, want_grads = outputs_and_grads(
      lambda q, k, v: attend(q, k, v, masks.dense(mask)), q, k, v, cotangent.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2)
  for g, g_want in zip(got_grads, want_grads):
    assert g.dtype == jnp.bfloat16
    assert max_relative_error(g.astype(jnp.float32), g_want.astype(jnp.float32)) < 2e-2


class _Layer(nn.Module):
  """A residual attention layer (no RoPE) over [B, L, H * Dh] with a pluggable kernel."""

  kernel: object
  heads: int = 4
  kv_heads: int = 2

  @nn.compact
  def __call__(self, x_BxLxD, mask):
    b, l, d = x_BxLxD.shape
    dh = d // self.heads
    q = nn.DenseGeneral((self.heads, dh), name="q")(x_BxLxD)
    k = nn.DenseGeneral((self.kv_heads, dh), name="k")(x_BxLxD)
    v = nn.DenseGeneral((self.kv_heads, dh), name="v")(x_BxLxD)
    return x_BxLxD + self.kernel(q, k, v, mask).reshape(b, l, d), None


def _stack(kernel):
  scanned = nn.scan(nn.remat(_Layer), variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=nn.broadcast, length=2)
  return scanned(kernel)


def test_remat_scan_and_batch_sharding_match_attend():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.device_put(jnp.asarray(np.random.default_rng(5).normal(size=(2, 10, 32)),
                                 jnp.float32), batch)
  mask = jax.device_put(_packed(2, 10, 10), batch)
  block = _stack(lambda q, k, v, m: blockwise_attention(q, k, v, m, block_k=4))
  plain = _stack(lambda q, k, v, m: attend(q, k, v, masks.dense(m)))
  params = block.init(jax.random.key(0), x, mask)

  def loss(model):
    return jax.jit(jax.value_and_grad(lambda p, x: (model.apply(p, x, mask)[0] ** 2).sum(),
                                      argnums=(0, 1)))(params, x)

  (got, (got_p, got_x)), (want, (want_p, want_x)) = loss(block), loss(plain)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert max_relative_error(got_x, want_x) < 1e-5
  # relative to the largest parameter gradient: the k bias's is zero up to rounding (a shift of
  # every score in a row), which a per-leaf relative error would compare noise against noise
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_p))
  for g, g_want in zip(jax.tree.leaves(got_p), jax.tree.leaves(want_p)):
    assert float(jnp.abs(g - g_want).max()) < 1e-5 * scale


def test_backward_keeps_no_scores_sized_buffer():
  """jit(grad) at W = S = 2048, H = 4, Dh = 64, block_k = 256 on CPU: XLA's temporary memory
  stays below one float32 [H, W, S] buffer (64 MiB); the plain attention's exceeds it."""
  spec = jax.ShapeDtypeStruct((1, 2048, 4, 64), jnp.float32)
  scores_bytes = 4 * 2048 * 2048 * 4

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
    return grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

  blockwise = temp_bytes(lambda q, k, v: blockwise_attention(q, k, v, None, block_k=256))
  plain = temp_bytes(lambda q, k, v: attend(q, k, v, None))
  assert plain > scores_bytes, plain
  assert blockwise < 0.8 * scores_bytes, blockwise
