"""The jitted sampler against a plain reference decoder written here from docs/sampler.md."""

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dcjax.diffusion import schedule
from dcjax.diffusion.sampler import generate
from dcjax import model as model_lib
from dcjax.model import (ModelConfig, abstract_params, apply, keep_positions, pair_mask,
                         param_shardings)
from dcjax.parallel.mesh import make_mesh
from tests.trees import assert_trees_close

MASK, PAD = 95, 0
CONFIG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10_000.0,
                     mask_token_id=MASK, pad_token_id=PAD, eos_token_id=1)
N = 16


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.4):
  """Every weight random (biases and norms too), made on the host: no XLA compile.

  The wide scale makes the model's distributions peaked, so confidences are well separated
  (near-ties would make "token-identical" depend on rounding).
  """
  shapes = nn.meta.unbox(abstract_params(config))
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.RandomState(seed)
  values = []
  for path, leaf in leaves:
    if getattr(path[-1], "key", None) == "weight":  # RMSNorm
      values.append(1.0 + 0.2 * rng.randn(*leaf.shape))
    else:
      values.append(scale * rng.randn(*leaf.shape))
  return jax.tree_util.tree_unflatten(tree, [jnp.asarray(v, jnp.float32) for v in values])


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG)


def left_padded_prompts(seed: int, pads=(0, 2, 4, 5), width: int = 6):
  """(ids, keep): random prompts of `width` tokens, row i left-padded with pads[i] PADs."""
  ids = np.random.RandomState(seed).randint(2, 90, (len(pads), width)).astype(np.int32)
  keep = np.arange(width)[None] >= np.asarray(pads)[:, None]
  return np.where(keep, ids, PAD), keep


@pytest.fixture(scope="module")
def prompts():
  """Left-padded [4, 6] prompts: rows 1, 2, 3 have 2, 4, 5 pads."""
  return left_padded_prompts(0)


_RUNS = {}


def run(params, prompts, **kwargs):
  """`generate` on the shared prompts, memoised on its options (compiles are the cost)."""
  key = tuple(sorted((k, v if not isinstance(v, jax.Array) else str(jax.random.key_data(v)))
                     for k, v in kwargs.items()))
  if key not in _RUNS:
    ids, keep = prompts
    _RUNS[key] = generate(CONFIG, params, ids, keep, max_new_tokens=N, **kwargs)
  return _RUNS[key]


# ----------------------------------------------------------------------------- reference

forward = jax.jit(lambda prm, tokens, keep: apply(CONFIG, prm, tokens, keep))



def reference_decode(params, ids, keep, *, max_new_tokens, steps, alg, eps=1e-3,
                     block_length=None):
  """docs/sampler.md as a plain Python loop: one `dcjax.model.apply` call per step.

  Greedy proposals (temperature 0), Dream's float32 schedule from torch.linspace, LLaDA
  counts per block; confidences on the distribution with the mask token, which is never
  proposed (dcjax). Returns (tokens, reveal_step).
  """
  b, p = ids.shape
  n = max_new_tokens
  x = np.concatenate([ids, np.full((b, n), MASK, np.int32)], axis=1)
  keep = np.concatenate([keep, np.ones((b, n), bool)], axis=1)
  reveal = np.full(x.shape, -1)
  num_blocks = 1 if block_length is None else n // block_length
  steps_per_block = steps // num_blocks
  step = 0
  for blk in range(num_blocks):
    lo = p if block_length is None else p + blk * block_length
    hi = p + n if block_length is None else lo + block_length
    timesteps = torch.linspace(1, eps, steps_per_block + 1)
    in_block = (x[:, lo:hi] == MASK).sum(axis=1)
    base, remainder = in_block // steps_per_block, in_block % steps_per_block
    for i in range(steps_per_block):
      logits = torch.from_numpy(np.array(forward(params, x, keep), np.float32))
      logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position j reads j - 1
      masked = torch.from_numpy(x == MASK)
      masked[:, :lo] = False
      masked[:, hi:] = False
      probs = torch.softmax(logits, dim=-1)  # Dream's distribution: the mask token included
      x0 = torch.where(torch.arange(probs.shape[-1]) == MASK, -1.0, probs).argmax(dim=-1)
      confidence = torch.gather(probs, -1, x0[..., None])[..., 0]
      if alg == "topk_margin":
        top2 = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = top2[..., 0] - top2[..., 1]
      elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
      confidence = torch.where(masked, confidence, -torch.inf).numpy()
      if block_length is None:
        t, s = timesteps[i], timesteps[i + 1]
        num_mask_token = masked.sum() / b
        k = int(num_mask_token * (1 - s / t)) if i < steps_per_block - 1 else int(num_mask_token)
        counts = [k] * b
      else:
        counts = base + (i < remainder)
      for row in range(b):
        chosen = np.argsort(-confidence[row], kind="stable")[:counts[row]]
        chosen = chosen[masked[row, chosen].numpy()]  # never re-mask
        x[row, chosen] = x0[row, chosen].numpy()
        reveal[row, chosen] = step
      step += 1
  return x, reveal


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", [{}, {"dtype": "bfloat16"},
                                     {"attention_impl": "dot_product_attention"}])
def test_collecting_forward_equals_model_apply(params, prompts, variant):
  config = dataclasses.replace(CONFIG, **variant)
  ids, keep = prompts
  tokens = np.concatenate([ids, np.full((4, N), MASK, np.int32)], axis=1)
  tokens[:, 10] = 7
  keep_l = np.concatenate([keep, np.ones((4, N), bool)], axis=1)
  keep_l[2] = False  # a fully padded row
  want = jax.jit(lambda p, t, k: apply(config, p, t, k))(params, tokens, keep_l)

  @jax.jit
  def collecting(p, t, k):  # the sampler's refresh pass: K/V kept, logits of one window
    cache, logits = model_lib.forward(config, p, t, keep_positions(k),
                                      model_lib.masks.keep_segments(k), collect_kv=True,
                                      logits_start=3, logits_length=12)
    return cache, logits

  cache, got = collecting(params, tokens, keep_l)
  want = want[:, 3:15]
  assert cache.k.shape == (CONFIG.num_layers, 4, tokens.shape[1], CONFIG.num_kv_heads,
                           CONFIG.head_dim) and cache.k.dtype == jnp.dtype(config.dtype)
  assert got.dtype == want.dtype
  tol = 1e-5 if config.dtype == "float32" else 3e-2  # the head runs on the slice only
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)
  assert np.isfinite(np.asarray(got, np.float32)).all()


@pytest.mark.parametrize("start,width", [(8, 14)])
def test_window_forward_with_fresh_cache_equals_full(params, prompts, start, width):
  ids, keep = prompts
  tokens = jnp.asarray(np.concatenate([ids, np.full((4, N), MASK, np.int32)], axis=1))
  keep_l = jnp.asarray(np.concatenate([keep, np.ones((4, N), bool)], axis=1))

  @jax.jit
  def full_and_window(params, tokens, keep_l):
    positions = keep_positions(keep_l)
    kv, logits = model_lib.forward(CONFIG, params, tokens, positions, pair_mask(keep_l, keep_l),
                                   collect_kv=True)
    sl = lambda x: x[:, start:start + width]
    kv_win, logits_win = model_lib.forward(CONFIG, params, sl(tokens), sl(positions),
                                           pair_mask(sl(keep_l), keep_l), cache=kv,
                                           cache_start=start, collect_kv=True)
    return sl(logits), logits_win, kv, kv_win

  logits, logits_win, kv, kv_win = full_and_window(params, tokens, keep_l)
  np.testing.assert_allclose(np.asarray(logits_win), np.asarray(logits), rtol=1e-5, atol=1e-5)
  # The window's fresh K/V replace the cached ones: equal to the full pass's, to rounding.
  assert len(kv) == 2  # (K, V)
  assert_trees_close(kv_win, kv, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Dream


@pytest.mark.parametrize("alg,steps,block_length", [("maskgit_plus", 16, None),
                                                    ("topk_margin", 8, None),
                                                    ("entropy", 16, None),
                                                    ("entropy", 8, 4)])
def test_greedy_generate_equals_reference(params, prompts, alg, steps, block_length):
  ids, keep = prompts
  want_tokens, want_reveal = reference_decode(params, ids, keep, max_new_tokens=N, steps=steps,
                                              alg=alg, block_length=block_length)
  out = run(params, prompts, steps=steps, alg=alg, block_length=block_length)
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tokens)
  np.testing.assert_array_equal(np.asarray(out.reveal_step), want_reveal)
  assert int(out.num_steps) == steps
  assert (want_tokens[:, 6:] != MASK).all()


_COMPILES: list | None = None


def _on_event(event, duration, **kwargs):
  del duration, kwargs
  if _COMPILES is not None and event == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def _counting_compiles():
  """Collects the XLA compilations made inside the block."""
  global _COMPILES  # pylint: disable=global-statement
  _COMPILES = []
  try:
    yield _COMPILES
  finally:
    _COMPILES = None


def _counts_per_step(reveal_step, num_steps, p=6):
  gen = np.asarray(reveal_step)[:, p:]
  return np.stack([(gen == i).sum(axis=1) for i in range(num_steps)], axis=1)  # [B, T]


@pytest.mark.parametrize("block_length", [None, 8])
def test_origin_reveal_counts_match_expectation(params, block_length):
  rows, steps, n = 128, 8, 16
  ids = np.random.RandomState(1).randint(2, 90, (rows, 6)).astype(np.int32)
  counts = []
  for seed in range(2):
    out = generate(CONFIG, params, ids, None, max_new_tokens=n, steps=steps, alg="origin",
                   temperature=0.8, top_p=0.9, block_length=block_length,
                   rng=jax.random.key(seed))
    counts.append(_counts_per_step(out.reveal_step, steps))
    assert (np.asarray(out.tokens)[:, 6:] != MASK).all()
  counts = np.concatenate(counts)
  # E[masked before step i] = width * t_i (t_0 = 1), so E[count_i] = width * (t_i - t_{i+1})
  # with the last step revealing everything left.
  num_blocks = 1 if block_length is None else n // block_length
  spb, width = steps // num_blocks, n // num_blocks
  ts = schedule.dream_timesteps(spb).astype(np.float64)
  expected = np.tile(width * np.append(ts[:-2] - ts[1:-1], ts[-2]), num_blocks)
  tolerance = 4 * counts.std(axis=0) / np.sqrt(counts.shape[0]) + 1e-3
  assert (np.abs(counts.mean(axis=0) - expected) < tolerance).all(), (counts.mean(0), expected)


@pytest.mark.parametrize("alg,block_length", [("entropy", None), ("topk_margin", 4)])
def test_sampling_paths_reveal_schedule_counts(params, prompts, alg, block_length):
  ids, keep = prompts
  keep = keep.copy()
  keep[2] = False  # a row that is all padding (its completion has no context)
  ids = np.where(keep, ids, PAD)
  steps = 8
  kwargs = dict(max_new_tokens=N, steps=steps, alg=alg, top_p=0.95, top_k=40, alg_temp=0.5,
                block_length=block_length, return_history=True)
  first = generate(CONFIG, params, ids, keep, temperature=0.9, rng=jax.random.key(0), **kwargs)
  # Another seed, temperature and prompt of the same shape reuse the compiled program.
  ids2 = np.where(keep, (ids + 7) % 90, PAD)
  with _counting_compiles() as compiles:
    second = generate(CONFIG, params, ids2, keep, temperature=1.2, rng=jax.random.key(1),
                      **kwargs)
  assert compiles == []
  np.testing.assert_array_equal(np.asarray(second.tokens)[:, :6], ids2)
  want = schedule.build_schedule(N, steps, block_length=block_length).reveal_count
  for out in (first, second):
    np.testing.assert_array_equal(_counts_per_step(out.reveal_step, steps),
                                  np.broadcast_to(want, (4, steps)))
    tokens = np.asarray(out.tokens)[:, 6:]
    assert ((tokens >= 0) & (tokens < CONFIG.vocab_size) & (tokens != MASK)).all()
    # Padded rows (row 2 is all padding) never produce NaN.
    history = np.asarray(out.step_confidence)
    assert history.shape == (steps, 4, N) and not np.isnan(history).any()
  assert not np.array_equal(np.asarray(first.tokens)[:, 6:], np.asarray(second.tokens)[:, 6:])


def test_padded_prompt_equals_unpadded_prompt_alone(params, prompts):
  ids, _ = prompts
  batch = run(params, prompts, steps=16, alg="entropy", block_length=None)
  alone = generate(CONFIG, params, ids[3:4, 5:], None, max_new_tokens=N, steps=16,
                   alg="entropy")  # row 3 without its 5 pads
  np.testing.assert_array_equal(np.asarray(batch.tokens)[3, 6:], np.asarray(alone.tokens)[0, 1:])
  np.testing.assert_array_equal(np.asarray(batch.reveal_step)[3, 6:],
                                np.asarray(alone.reveal_step)[0, 1:])


# ----------------------------------------------------------------------------- beyond Dream


def test_threshold_one_is_one_token_per_step(params, prompts):
  plain = run(params, prompts, steps=N, alg="maskgit_plus", block_length=8)
  fast = run(params, prompts, steps=N, alg="maskgit_plus", block_length=8, threshold=1.0)
  np.testing.assert_array_equal(np.asarray(fast.tokens), np.asarray(plain.tokens))
  np.testing.assert_array_equal(np.asarray(fast.reveal_step), np.asarray(plain.reveal_step))
  assert int(fast.num_steps) == N


def test_threshold_zero_fills_a_block_per_step(params, prompts):
  out = run(params, prompts, steps=N, alg="entropy", block_length=4, threshold=0.0)
  assert int(out.num_steps) == N // 4  # early exit: one step per block
  reveal = np.asarray(out.reveal_step)[:, 6:]
  np.testing.assert_array_equal(reveal, np.repeat(np.arange(N // 4), 4)[None].repeat(4, 0))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_cache_free(params, prompts, cache):
  kwargs = dict(steps=N, alg="maskgit_plus", block_length=8)
  free = run(params, prompts, **kwargs)
  cached = run(params, prompts, cache=cache, cache_refresh_every=1, **kwargs)
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(free.tokens))
  np.testing.assert_array_equal(np.asarray(cached.reveal_step), np.asarray(free.reveal_step))
  assert int(cached.num_full_forwards) == int(cached.num_steps) == int(free.num_steps)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_one_layer_cache_once_per_block_equals_cache_free(prompts, cache):
  # With one layer, K/V depend only on each position's own token, and the prefix (and the
  # all-mask suffix) do not change while a block is refined: the cache is exact there.
  config = dataclasses.replace(CONFIG, num_layers=1)
  params = random_params(config, seed=1)
  ids, keep = prompts
  kwargs = dict(max_new_tokens=N, steps=N, alg="maskgit_plus", block_length=8, threshold=0.3)
  free = generate(config, params, ids, keep, **kwargs)
  cached = generate(config, params, ids, keep, cache=cache, **kwargs)
  assert int(cached.num_full_forwards) == N // 8  # one whole-canvas pass per block
  assert int(cached.num_steps) == int(free.num_steps) < N
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(free.tokens))
  np.testing.assert_array_equal(np.asarray(cached.reveal_step), np.asarray(free.reveal_step))


# ----------------------------------------------------------------------------- sharding


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    dict(steps=16, alg="entropy", block_length=None),
    dict(steps=N, alg="topk_margin", temperature=0.7, alg_temp=0.3, block_length=8,
         threshold=0.2, cache="dual", rng=jax.random.key(5)),
    dict(steps=N, alg="random", cfg_scale=1.0, block_length=8, early_stop=True,
         confidence_eos_eot_inf=True, logits_eos_inf=True, rng=jax.random.key(2)),
])
def test_sharded_equals_unsharded(params, prompts, kwargs):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ids, keep = prompts
  single = run(params, prompts, **kwargs)
  sharded_params = jax.device_put(params, param_shardings(CONFIG, mesh))
  sharded = generate(CONFIG, sharded_params, ids, keep, max_new_tokens=N, mesh=mesh, **kwargs)
  assert len(sharded.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
  np.testing.assert_array_equal(np.asarray(sharded.reveal_step), np.asarray(single.reveal_step))
  assert int(sharded.num_steps) == int(single.num_steps)
  if kwargs.get("threshold") is not None:
    assert int(single.num_steps) < N  # threshold decoding revealed several tokens in a step


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("change,match", [
    (dict(prompt_ids_BxP=np.zeros((6,), np.int32)), "prompt_ids_BxP"),
    (dict(prompt_mask_BxP=np.ones((4, 5), bool)), "prompt_mask_BxP"),
    (dict(alg="greedy"), "alg"),
    (dict(alg="origin", threshold=0.9), "origin"),
    (dict(block_length=5), "block_length"),
    (dict(cache="full"), "cache"),
    (dict(temperature=0.5), "rng"),
])
def test_bad_arguments_raise_naming_them(params, prompts, change, match):
  ids, keep = prompts
  args = dict(prompt_ids_BxP=ids, prompt_mask_BxP=keep, max_new_tokens=N, steps=8,
              alg="entropy")
  args.update(change)
  with pytest.raises(ValueError, match=match):
    generate(CONFIG, params, args.pop("prompt_ids_BxP"), args.pop("prompt_mask_BxP"), **args)
