"""The LM head applied in sequence chunks (model/head.py) equals the whole-sequence head:
the diffusion loss and the GRPO log-prob passes, values and gradients, in float32."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dcjax import model as model_lib
from dcjax.diffusion import forward_process as fp
from dcjax.diffusion import losses
from dcjax.model import head
from dcjax.parallel import mesh as mesh_lib
from dcjax.rl import logprobs
from tests.trees import assert_trees_close

CONFIG = model_lib.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4,
                               mask_token_id=95, logits_chunk=0)
B, L = 3, 24


def test_chunk_size_is_the_largest_divisor():
  assert head.chunk_size(24, 0) == 24 and head.chunk_size(24, 100) == 24
  assert head.chunk_size(24, 7) == 6 and head.chunk_size(23, 8) == 1


def test_label_is_argmax_equals_argmax_with_ties():
  """The two-reduction hit test is `argmax == label`, first maximum winning ties: logits
  rounded to few values tie often, and labels sit on every tied position of some rows."""
  rng = np.random.default_rng(0)
  logits = np.round(rng.normal(size=(6, 40, 17)) * 1.5).astype(np.float32)
  logits[0, :, :] = 0.0                                  # every index ties
  labels = rng.integers(0, 17, size=(6, 40)).astype(np.int32)
  top = logits.max(-1, keepdims=True)
  tied = np.argwhere((logits == top).sum(-1) > 1)
  assert len(tied) > 20
  for b, m in tied[::2]:                                 # a label on the last tied maximum
    labels[b, m] = np.flatnonzero(logits[b, m] == top[b, m, 0])[-1]
  labels[1, :5] = np.argmax(logits[1, :5], -1)           # and on the first
  label_logit = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  hit = head.label_is_argmax(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(label_logit))
  expected = np.argmax(logits, -1) == labels
  assert 0 < expected.sum() < expected.size
  np.testing.assert_array_equal(np.asarray(hit), expected)


@pytest.mark.parametrize("chunk", [5, 8])  # 5 -> chunks of 4 (largest divisor of 24)
def test_chunked_diffusion_loss_and_grads_equal_whole_sequence(chunk):
  params = model_lib.init_params(CONFIG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, 95)
  cfg = losses.LossConfig(noise=fp.NoiseConfig(truncate_prob=0.5), document_mask=False)
  batch = losses.as_batch(tokens)
  prepared = losses.prepare(batch, fp.draw_noise(jax.random.key(2), B, L, cfg.noise), 95, cfg)
  mask, positions = losses.model_inputs(prepared, None, cfg)

  def whole(p):
    logits = model_lib.apply(CONFIG, p, prepared["noisy"], mask, positions)
    sums = losses.loss_sums(logits, prepared)
    return sums["loss_sum"], sums

  chunked_config = dataclasses.replace(CONFIG, logits_chunk=chunk)

  def chunked(p):
    hidden = model_lib.hidden(chunked_config, p, prepared["noisy"], mask, positions)
    sums = losses.hidden_loss_sums(chunked_config, p, hidden, prepared)
    return sums["loss_sum"], sums

  (ref, ref_sums), ref_grads = jax.value_and_grad(whole, has_aux=True)(params)
  (out, out_sums), out_grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
  assert float(ref_sums["targets"]) > 5  # the loss has targets to compare
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  for key in losses.SUM_KEYS:
    np.testing.assert_allclose(out_sums[key], ref_sums[key], rtol=1e-5, err_msg=key)
  assert_trees_close(out_grads, ref_grads, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(out_grads["lm_head"]["kernel"]).max()) > 0


def test_chunked_grpo_logps_and_grads_equal_whole_sequence():
  params = model_lib.init_params(CONFIG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, 95)
  est = logprobs.EstimatorConfig("coupled", num_pairs=1)
  noise = logprobs.draw_noise(jax.random.key(3), B, 12, est)

  def total(config, p):
    logp, ent = logprobs.per_token_logps(config, p, tokens, noise, est, 95, with_entropy=True)
    return jnp.sum(logp * jnp.arange(12)), (logp, ent)

  ref = jax.value_and_grad(lambda p: total(CONFIG, p), has_aux=True)(params)
  out = jax.value_and_grad(lambda p: total(dataclasses.replace(CONFIG, logits_chunk=4), p),
                           has_aux=True)(params)
  (ref_v, (ref_lp, ref_ent)), ref_g = ref
  (out_v, (out_lp, out_ent)), out_g = out
  np.testing.assert_allclose(out_lp, ref_lp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out_ent, ref_ent, rtol=1e-5, atol=1e-6)
  assert_trees_close(out_g, ref_g, rtol=1e-5, atol=1e-6)


def _wanted_case(b, m, per_row, seed=0):
  """Hidden states, labels and a `where` mask with exactly `per_row` wanted positions in
  each row (random places); unwanted positions' hidden states are NaN."""
  rng = np.random.default_rng(seed)
  where = np.zeros((b, m), bool)
  for row in where:
    row[rng.choice(m, per_row, replace=False)] = True
  hidden = rng.standard_normal((b, m, CONFIG.hidden_size)).astype(np.float32)
  labels = rng.integers(0, CONFIG.vocab_size, (b, m)).astype(np.int32)
  weights = rng.uniform(0.5, 2.0, (b, m)).astype(np.float32)
  return hidden, labels, where, weights


@pytest.mark.parametrize("mesh_axes,remat,entropy_weight", [
    (None, "none", 0.3), ({"data": 2, "fsdp": 2, "tensor": 2}, "full", 0.3),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "none", 0.3), (None, "full", None),
    (None, "none", None)])
def test_scoring_wanted_positions_equals_the_whole_head_and_skips_the_rest(
    mesh_axes, remat, entropy_weight):
  """`token_logps(where=...)` gives the whole head's log-probs, hits and entropies at the
  wanted positions and 0 / False elsewhere, with the same gradients; chunks holding no wanted
  position are skipped: the unwanted hidden states are NaN and nothing turns NaN (a computed
  chunk's NaN rows would poison the kernel's gradient). Under a mesh the positions sort
  within each of the 4 batch shards. The head runs in chunks and its backward recomputes the
  logits (remat "full"), or in one matmul per bucket and reads the forward's ("none",
  `head._bucketed_stats`); the entropy is in the loss (its gradient is checked) or a
  metric only (`entropy_weight` None: its symbolic-zero cotangent is skipped)."""
  # remat "full": chunks of 8 sorted positions, whole chunks wanted or unwanted; "none":
  # buckets of 96/8 = 12 rows (24/8 = 3 per batch shard), whole buckets wanted or unwanted
  b, m, per_row = 4, 24, 8 if remat == "full" else 6
  config = dataclasses.replace(CONFIG, logits_chunk=8, remat_policy=remat)
  ew = 0.0 if entropy_weight is None else entropy_weight
  params = model_lib.init_params(CONFIG, jax.random.key(0))
  hidden, labels, where, weights = _wanted_case(b, m, per_row)
  clean = np.where(where[..., None], hidden, 0.0).astype(np.float32)
  nan_hidden = np.where(where[..., None], hidden, np.nan).astype(np.float32)

  def whole(p, h):
    stats = head.token_logps(CONFIG, p, h, labels, with_entropy=True)
    terms = weights * stats["logp"] + ew * stats["entropy"]
    return jnp.sum(jnp.where(where, terms, 0.0)), stats

  def wanted(p, h):
    stats = head.token_logps(config, p, h, labels, with_entropy=True, where=where)
    terms = weights * stats["logp"]
    if entropy_weight is not None:
      terms = terms + entropy_weight * stats["entropy"]
    return jnp.sum(terms), stats

  grad = lambda f, h: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, h)
  (ref, ref_stats), ref_grads = grad(whole, clean)
  if mesh_axes is None:
    assert head.batch_groups(b) == 1
    (out, stats), grads = grad(wanted, nan_hidden)
  else:
    mesh = mesh_lib.make_mesh(mesh_axes)
    with jax.set_mesh(mesh):
      assert head.batch_groups(b) == 4 and head.batch_groups(2) == 2
      sharded = jax.device_put(nan_hidden, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
      (out, stats), grads = grad(wanted, sharded)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  for key in ("logp", "entropy"):
    np.testing.assert_allclose(stats[key], np.where(where, ref_stats[key], 0.0), rtol=1e-5,
                               atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(stats["hit"], np.asarray(ref_stats["hit"]) & where)
  assert_trees_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[1], np.where(where[..., None], ref_grads[1], 0.0),
                             rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(grads[1])).max() > 0


def _eqns(jaxpr, name, found):
  """The equations of primitive `name` in a jaxpr and every jaxpr nested in it."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _eqns(sub, name, found)
  return found


def _dots(jaxpr) -> int:
  return len(_eqns(jaxpr, "dot_general", []))


def test_the_heads_backward_matmuls_with_and_without_remat():
  """remat "full": the chunk loop's backward recomputes each chunk's logits (1 forward + 3
  backward matmuls in the traced program). remat "none": the forward's switch runs one
  matmul in each non-empty branch and returns only the taken branch's statistics and
  logits (differentiating a switch would return every branch's residuals), and the
  backward's branches run the gradient's two matmuls, reading the kept logits."""
  hidden, labels, where, weights = _wanted_case(4, 24, 8)
  params = model_lib.init_params(CONFIG, jax.random.key(0))

  def jaxpr(remat):
    config = dataclasses.replace(CONFIG, logits_chunk=8, remat_policy=remat)
    f = lambda p, h: jnp.sum(weights * head.token_logps(config, p, h, labels, where=where)[
        "logp"])
    return jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(params, hidden).jaxpr

  assert _dots(jaxpr("full")) == 4
  k = head.buckets(4 * 24)
  switches = [e for e in _eqns(jaxpr("none"), "cond", []) if len(e.params["branches"]) == k + 1]
  assert len(switches) == 2
  forward, backward = switches
  assert len(forward.outvars) == 3  # logp, hit, logits
  assert [_dots(b.jaxpr) for b in forward.params["branches"]] == [0] + [1] * k
  assert [_dots(b.jaxpr) for b in backward.params["branches"]] == [0] + [2] * k


def test_scoring_no_wanted_position_is_all_zeros():
  params = model_lib.init_params(CONFIG, jax.random.key(0))
  hidden, labels, _, _ = _wanted_case(2, 24, 1)
  none = np.zeros((2, 24), bool)
  f = lambda h: jnp.sum(head.token_logps(CONFIG, params, h, labels, where=none)["logp"])
  value, grad = jax.value_and_grad(f)(jnp.full_like(hidden, jnp.nan))
  assert float(value) == 0.0 and not np.asarray(grad).any()
