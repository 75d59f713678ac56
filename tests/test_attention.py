"""The plain attention's and rope's hand-written backward passes (dcjax/model/attention.py,
dcjax/model/rope.py) against torch autograd through transformers' Qwen2 attention arithmetic
(repeat_kv + sdpa; rotate_half rope) and against JAX's own differentiation of the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dcjax.model import masks, rope
from dcjax.model.attention import attend


def _qkv(seed, b, w, s, h, kv, dh):
  r = np.random.default_rng(seed)
  return [r.normal(size=shape).astype(np.float32)
          for shape in ((b, w, h, dh), (b, s, kv, dh), (b, s, kv, dh), (b, w, h, dh))]


def _torch_attention(q, k, v, keep, cotangent):
  """transformers' sdpa path: heads first, kv heads repeated, a boolean mask; autograd."""
  from transformers.models.qwen2.modeling_qwen2 import repeat_kv  # pylint: disable=import-outside-toplevel
  tq, tk, tv = (torch.tensor(a.transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  mask = None if keep is None else torch.tensor(keep)[:, None]
  out = torch.nn.functional.scaled_dot_product_attention(
      tq, repeat_kv(tk, group), repeat_kv(tv, group), attn_mask=mask)
  out.backward(torch.tensor(cotangent.transpose(0, 2, 1, 3)))
  to_np = lambda t: t.detach().numpy().transpose(0, 2, 1, 3)
  return [to_np(t) for t in (out, tq.grad, tk.grad, tv.grad)]


def _jax(fn, q, k, v, cotangent):
  out, vjp = jax.vjp(fn, *(jnp.asarray(a) for a in (q, k, v)))
  return [np.asarray(a) for a in (out,) + vjp(jnp.asarray(cotangent))]


@pytest.mark.parametrize("b,w,s,h,kv,dh,mask", [
    (2, 7, 7, 4, 2, 16, "none"),      # GQA 2:1, no mask
    (3, 9, 9, 6, 2, 8, "segments"),   # GQA 3:1, left padding and two documents
    (2, 5, 11, 2, 2, 32, "dense"),    # queries a window of the keys, a random dense mask
])
def test_attend_matches_torch_sdpa_forward_and_gradients(b, w, s, h, kv, dh, mask):
  q, k, v, cotangent = _qkv(w * 31 + h, b, w, s, h, kv, dh)
  r = np.random.default_rng(s)
  if mask == "none":
    keep = None
    jax_mask = None
  elif mask == "segments":
    seg = np.ones((b, s), np.int32)
    seg[0, :3] = 0          # left padding (pads see pads)
    seg[1, 5:] = 2          # a second packed document
    jax_mask = masks.dense(masks.Segments(jnp.asarray(seg[:, :w]), jnp.asarray(seg)))
    keep = np.asarray(jax_mask)
  else:
    keep = r.random((b, w, s)) < 0.6
    keep[:, :, 0] = True    # sdpa turns a row with no visible key into NaN; attend does not
    jax_mask = jnp.asarray(keep)
  want = _torch_attention(q, k, v, keep, cotangent)
  got = _jax(lambda q_, k_, v_: attend(q_, k_, v_, jax_mask), q, k, v, cotangent)
  for name, g, t in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, t, rtol=2e-5, atol=2e-5, err_msg=name)


def _attend_by_autodiff(q, k, v, mask):
  """The plain attention's formula, differentiated by JAX (what `attend` ran before its
  backward was written out)."""
  b, w, h, dh = q.shape
  kv = k.shape[2]
  scores = jnp.einsum("blkgd,bmkd->bkglm", q.reshape(b, w, kv, h // kv, dh), k,
                      preferred_element_type=jnp.float32) * dh ** -0.5
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkglm,bmkd->blkgd", probs, v).reshape(b, w, h, dh)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attend_backward_equals_differentiating_the_formula(dtype, tol):
  """Including a query row with every key masked (uniform probabilities, no gradient to its
  scores) and bfloat16 activations (float32 scores and softmax)."""
  q, k, v, cotangent = (jnp.asarray(a, dtype) for a in _qkv(5, 3, 6, 10, 8, 2, 16))
  keep = np.random.default_rng(0).random((3, 6, 10)) < 0.5
  keep[1, 2] = False
  for mask in (None, jnp.asarray(keep)):
    got = jax.jit(lambda *a, m=mask: jax.vjp(lambda *x: attend(*x, m), *a[:3])[1](a[3]))(
        q, k, v, cotangent)
    want = jax.jit(lambda *a, m=mask: jax.vjp(
        lambda *x: _attend_by_autodiff(*x, m), *a[:3])[1](a[3]))(q, k, v, cotangent)
    outs = (attend(q, k, v, mask), _attend_by_autodiff(q, k, v, mask))
    for g, t in zip(got + (outs[0],), want + (outs[1],)):
      assert g.dtype == dtype
      scale = float(jnp.max(jnp.abs(t.astype(jnp.float32))))
      err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - t.astype(jnp.float32))))
      assert err <= tol * scale, (err, scale)


def _rope_by_autodiff(x, cos, sin):
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_backward_is_bitwise_the_differentiated_formula(dtype):
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(2, 5, 3, 16)), dtype)
  dy = jnp.asarray(r.normal(size=x.shape), dtype)
  positions = jnp.asarray(r.integers(0, 4000, (2, 5)), jnp.int32)
  cos, sin = rope.rope_cos_sin(positions, 16, 1_000_000.0)
  got_y, got_vjp = jax.vjp(lambda x_: rope.apply_rope(x_, cos, sin), x)
  want_y, want_vjp = jax.vjp(lambda x_: _rope_by_autodiff(x_, cos, sin), x)
  np.testing.assert_array_equal(got_y, want_y)
  np.testing.assert_array_equal(got_vjp(dy)[0], want_vjp(dy)[0])
  assert got_vjp(dy)[0].dtype == dtype
