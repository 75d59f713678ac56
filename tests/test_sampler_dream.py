"""The jitted sampler against a torch port of Dream's loop on transformers' Qwen2.

Greedy runs must be token-identical (padded rows included), also when infilling (mask tokens
inside the prompt, rows with different mask counts); sampled runs must reveal the same number
of positions at each step in distribution.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from dcjax.diffusion import schedule
from dcjax.diffusion.sampler import generate
from dcjax.model import apply, hf
from tests.dream_reference import canvas, dream_generate, reveal_counts, step_proposals
from tests.hf_reference import random_qwen2

VOCAB, MASK, PAD = 517, 511, 0
N = STEPS = 48
MODEL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)


_MODELS = {}


def _model(kind, tmp_path_factory):
  """(forward for the port, dcjax config, params) of a transformers-made Qwen2 checkpoint
  with untrained-flat ("random") or "peaked" distributions."""
  if kind not in _MODELS:
    _MODELS[kind] = _make_model({"random": 0.1, "peaked": 0.5}[kind], tmp_path_factory)
  return _MODELS[kind]


def _make_model(scale, tmp_path_factory):
  reference = random_qwen2(seed=7, scale=scale, **MODEL)
  path = tmp_path_factory.mktemp("dream")
  reference.save_pretrained(path)
  config, params = hf.load_pretrained(str(path))
  config = dataclasses.replace(config, mask_token_id=MASK)
  forward = jax.jit(lambda tokens, pair, positions: apply(config, params, tokens, pair, positions))
  return forward, config, params


def _prompts(rows=4, length=8, seed=0):
  """Left-padded prompts: every other row has pads (3 and 6 of them)."""
  ids = np.random.default_rng(seed).integers(2, 500, (rows, length))
  keep = np.ones(ids.shape, bool)
  for r in range(1, rows, 2):
    keep[r, :3 if r % 4 == 1 else 6] = False
  ids[~keep] = PAD
  return ids, keep


TIE = 1e-5  # lockstep: confidences this close may be ranked either way by the two programs
# Free-running: a k-th/(k+1)-th gap of this many float32 spacings (ulps) or fewer could flip
# on rounding. The two programs sum the same confidences in different orders: on an AVX2 CPU a
# random model's entropy run met a one-ulp gap (4.8e-7 at -5.9) that they ranked differently.
NEAR_TIE = 4


@pytest.mark.slow
@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("kind, filters", [("random", {}), ("peaked", {"top_p": 0.9, "top_k": 40})],
                         ids=["random-plain", "peaked-top_p_k"])
def test_greedy_equals_dream(tmp_path_factory, kind, alg, filters):
  forward, config, params = _model(kind, tmp_path_factory)
  ids, keep = _prompts()
  p = ids.shape[1]
  out = generate(config, params, ids, keep, max_new_tokens=N, steps=STEPS, alg=alg, **filters)
  tokens, reveal = np.asarray(out.tokens), np.asarray(out.reveal_step)
  # Lockstep: each of dcjax's steps is Dream's step on dcjax's own canvas.
  _, pair, positions = canvas(ids, keep, MASK, N)
  for i in range(STEPS):
    before = (reveal < i) & (reveal >= 0)
    before[:, :p] = True
    x = torch.from_numpy(np.where(before, tokens, MASK).astype(np.int64))
    confidence, proposal, k = step_proposals(forward, x, pair, positions, mask_id=MASK, i=i,
                                             steps=STEPS, alg=alg, **filters)
    confidence, proposal = confidence.numpy(), proposal.numpy()
    chosen = reveal == i
    np.testing.assert_array_equal(chosen.sum(axis=1), k, err_msg=f"step {i}")
    np.testing.assert_array_equal(tokens[chosen], proposal[chosen], err_msg=f"step {i}")
    for row in range(len(ids)):
      others = (x[row].numpy() == MASK) & ~chosen[row]
      if chosen[row].any() and others.any():
        assert confidence[row, chosen[row]].min() >= confidence[row, others].max() - TIE, (i, row)
  # Free-running: token-identical to Dream's loop unless it met a near-tie (exact ties go to
  # the lower position in both).
  want, want_reveal, gap = dream_generate(forward, ids, keep, mask_id=MASK, max_new_tokens=N,
                                          steps=STEPS, alg=alg, **filters)
  if gap > NEAR_TIE:
    np.testing.assert_array_equal(tokens[:, p:], want[:, p:])
    np.testing.assert_array_equal(reveal[:, p:], want_reveal[:, p:])


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    dict(alg="origin", temperature=1.0, top_p=0.95),
    dict(alg="entropy", temperature=1.2, top_k=50, alg_temp=0.5),
    dict(alg="maskgit_plus", temperature=0.7, top_p=0.9, alg_temp=0.2),
], ids=["origin", "entropy-alg_temp", "maskgit-alg_temp"])
def test_sampled_reveal_counts_match_dream_in_distribution(tmp_path_factory, options):
  forward, config, params = _model("peaked", tmp_path_factory)
  ids, keep = _prompts(rows=32, seed=1)
  steps, n = 16, 16
  _, want, _ = dream_generate(forward, ids, keep, mask_id=MASK, max_new_tokens=n, steps=steps,
                           seed=3, **options)
  out = generate(config, params, ids, keep, max_new_tokens=n, steps=steps,
                 rng=jax.random.key(3), **options)
  got_counts = reveal_counts(np.asarray(out.reveal_step)[:, ids.shape[1]:], steps)
  want_counts = reveal_counts(want[:, ids.shape[1]:], steps)
  assert got_counts.sum() == want_counts.sum() == 32 * n  # every position revealed once
  if options["alg"] == "origin":
    # Binomial counts per step: equal means within 4 standard deviations of their difference.
    schedule = np.linspace(1, 1e-3, steps + 1, dtype=np.float32)
    remaining = 32 * n * np.concatenate([[1.0], np.cumprod(schedule[2:] / schedule[1:-1])])
    p = 1 - schedule[1:] / schedule[:-1]
    p[-1] = 1.0
    sd = np.sqrt(2 * remaining * p * (1 - p)) + 1
    assert (np.abs(got_counts - want_counts) <= 4 * sd).all(), (got_counts, want_counts)
  else:  # the confidence rules reveal a scheduled count: identical, step by step
    np.testing.assert_array_equal(got_counts, want_counts)


def _infill_canvas(kind, rows=4, length=20, seed=2):
  """Left-padded [4, 20] prompts with mask tokens inside: "middle" masks columns 8 .. 15 - r
  of row r (rows differ, so Dream's batch-average count is fractional) before a given
  suffix, nothing appended; "middle+end" masks columns 9 .. 12 and appends 16 masks."""
  ids, keep = _prompts(rows, length, seed)
  for r in range(rows):
    if kind == "middle":
      ids[r, 8:16 - r] = MASK
    else:
      ids[r, 9:13] = MASK
  return ids, keep, (0 if kind == "middle" else 16)


@pytest.mark.slow
@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("kind, steps", [("middle", 6), ("middle+end", 10)])
def test_greedy_infill_equals_dream(tmp_path_factory, alg, kind, steps):
  forward, config, params = _model("peaked", tmp_path_factory)
  ids, keep, n = _infill_canvas(kind)
  out = generate(config, params, ids, keep, max_new_tokens=n, steps=steps, alg=alg)
  tokens, reveal = np.asarray(out.tokens), np.asarray(out.reveal_step)
  want, want_reveal, gap = dream_generate(forward, ids, keep, mask_id=MASK, max_new_tokens=n,
                                          steps=steps, alg=alg)
  assert gap > NEAR_TIE, gap  # a meaningful comparison: no rounding-decided choice
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_array_equal(reveal, want_reveal)
  given = np.concatenate([ids != MASK, np.zeros((len(ids), n), bool)], axis=1)
  np.testing.assert_array_equal(tokens[given], np.concatenate(
      [ids, np.zeros((len(ids), n), ids.dtype)], axis=1)[given])  # given tokens kept
  assert (tokens != MASK).all() and ((reveal >= 0) == ~given).all()
  # The schedule counts every mask of the canvas (Dream's batch average over the rows).
  remaining = (ids == MASK).sum(axis=1) + n
  expected = []
  for k in schedule.dream_reveal_counts(remaining, steps):
    expected.append(np.minimum(remaining, k).sum())
    remaining = remaining - np.minimum(remaining, k)
  np.testing.assert_array_equal(reveal_counts(reveal, steps), expected)
