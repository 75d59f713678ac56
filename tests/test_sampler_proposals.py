"""Token proposals and confidences against a torch reference written from docs/sampler.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dcjax.diffusion import proposals
from tests.dream_reference import filtered


def torch_sample_tokens(logits, temperature=0.0, top_p=None, top_k=None):
  """Dream's `sample_tokens` (docs/sampler.md) in torch: temperature, top-p (first crossing
  token kept), top-k, softmax; greedy proposal. Returns (filtered probs, token,
  {alg: confidence})."""
  logits = filtered(torch.as_tensor(np.array(logits), dtype=torch.float32), temperature, top_p,
                    top_k)
  probs = torch.softmax(logits, dim=-1)
  confidence, token = probs.max(dim=-1)
  top2 = torch.sort(probs, dim=-1, descending=True)[0]
  confs = {"maskgit_plus": confidence, "topk_margin": top2[..., 0] - top2[..., 1],
           "entropy": torch.sum(probs * torch.log(probs + 1e-10), dim=-1)}
  return probs.numpy(), token.numpy(), {k: v.numpy() for k, v in confs.items()}


@pytest.fixture(scope="module")
def logits_NxV():
  rng = np.random.RandomState(0)
  return (rng.randn(64, 40) * rng.uniform(0.5, 4.0, (64, 1))).astype(np.float32)


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.0, None, None), (0.7, 0.9, None),
                                                     (1.3, None, 5), (0.4, 0.95, 7),
                                                     (0.0, 0.5, 3)])
def test_filtered_distribution_matches_reference(logits_NxV, temperature, top_p, top_k):
  want, _, _ = torch_sample_tokens(logits_NxV, temperature, top_p, top_k)
  x = proposals.filtered_logits(jnp.asarray(logits_NxV),
                                temperature=temperature if temperature > 0 else None,
                                top_p=top_p, top_k=top_k)
  got = np.asarray(jax.nn.softmax(x, axis=-1))
  np.testing.assert_array_equal(got == 0, want == 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("top_p,top_k", [(None, None), (0.9, 4)])
def test_greedy_confidences_match_reference(logits_NxV, alg, top_p, top_k):
  _, want_token, confs = torch_sample_tokens(logits_NxV, 0.0, top_p, top_k)
  token, confidence, prob = proposals.propose(jnp.asarray(logits_NxV), None, alg=alg,
                                              top_p=top_p, top_k=top_k)
  np.testing.assert_array_equal(np.asarray(token), want_token)
  np.testing.assert_allclose(np.asarray(confidence), confs[alg], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(prob), confs["maskgit_plus"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_forbidden_token_is_never_proposed_but_keeps_its_mass(logits_NxV, alg):
  x = logits_NxV.copy()
  x[:, 3] += 3.0  # the mask token: the argmax of many rows
  _, _, confs = torch_sample_tokens(x, 0.0, 0.9, None)  # Dream's confidences, mask included
  token, confidence, prob = proposals.propose(jnp.asarray(x), None, alg=alg, top_p=0.9,
                                              forbidden_token=3)
  token = np.asarray(token)
  assert (token != 3).all() and (x.argmax(-1) == 3).sum() > 10
  probs = np.asarray(jax.nn.softmax(proposals.filtered_logits(jnp.asarray(x), top_p=0.9)))
  np.testing.assert_allclose(np.asarray(prob), probs[np.arange(len(x)), token], rtol=1e-6)
  if alg != "maskgit_plus":  # margin and entropy do not depend on the proposed token
    np.testing.assert_allclose(np.asarray(confidence), confs[alg], rtol=1e-5, atol=1e-6)
  kept = probs > 0
  kept[:, 3] = False
  only_mask = ~kept.any(-1)
  best_kept = np.where(kept, x, -np.inf).argmax(-1)
  best_any = np.where(np.arange(x.shape[1]) == 3, -np.inf, x).argmax(-1)
  np.testing.assert_array_equal(token, np.where(only_mask, best_any, best_kept))
  assert only_mask.any() and (~only_mask).any()  # both the usual and the fallback case ran


def test_sampling_follows_filtered_distribution():
  logits_V = jnp.asarray([2.0, 1.5, 1.0, 0.2, -0.5, -1.0], jnp.float32)
  temperature, top_p = 0.7, 0.8
  want, _, _ = torch_sample_tokens(logits_V[None], temperature, top_p)
  draws = 8000
  batch = jnp.broadcast_to(logits_V, (draws, 6))
  propose = jax.jit(lambda x, key: proposals.propose(x, key, alg="maskgit_plus",
                                                     temperature=temperature, top_p=top_p))
  token, conf, prob = propose(batch, jax.random.key(0))
  freq = np.bincount(np.asarray(token), minlength=6) / draws
  np.testing.assert_array_equal(freq[want[0] == 0], 0)  # filtered tokens are never drawn
  np.testing.assert_allclose(freq, want[0], atol=0.02)
  # maskgit_plus confidence is the probability of the sampled token.
  np.testing.assert_allclose(np.asarray(conf), want[0][np.asarray(token)], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(conf), np.asarray(prob))


def test_gumbel_top_k_is_multinomial_without_replacement():
  confidence = jnp.asarray([[-0.2, -1.0, -0.5, -3.0, -0.9]], jnp.float32)
  masked = jnp.asarray([[True, True, True, True, False]])
  alg_temp, draws = 0.5, 8000
  keys = jax.random.split(jax.random.key(1), draws)

  @jax.jit
  def first_two_picks(keys):
    scores = jax.vmap(lambda k: proposals.position_scores(confidence, masked, k, alg_temp))(keys)
    return jnp.argsort(-scores[:, 0], axis=-1)[:, :2]

  first_two = np.asarray(first_two_picks(keys))
  p = np.asarray(jax.nn.softmax(jnp.where(masked, confidence, -jnp.inf)[0] / alg_temp))
  assert (first_two != 4).all()  # an unmasked position is never picked
  for i in range(4):
    for j in range(4):
      if i != j:
        exact = p[i] * p[j] / (1 - p[i])  # torch.multinomial(p, 2): ordered draws
        observed = np.mean((first_two[:, 0] == i) & (first_two[:, 1] == j))
        assert abs(observed - exact) < 0.015, (i, j, observed, exact)


def test_descending_rank_breaks_ties_by_index():
  ranks = proposals.descending_rank(jnp.asarray([[0.5, 0.9, 0.5, -jnp.inf, 0.9]]))
  np.testing.assert_array_equal(np.asarray(ranks), [[2, 0, 3, 4, 1]])


def test_topk_margin_with_a_tied_maximum_is_zero_as_in_the_reference():
  """The O(V) margin (max, then the max of the rest) against torch's sort when the largest
  probability is shared, and when only the second place is shared."""
  x = np.array([[2.0, 0.5, 2.0, -1.0, 0.1], [3.0, 1.0, -2.0, 1.0, 0.0]], np.float32)
  _, _, confs = torch_sample_tokens(x)
  _, confidence, _ = proposals.propose(jnp.asarray(x), None, alg="topk_margin")
  assert confs["topk_margin"][0] == 0 and confs["topk_margin"][1] > 0
  np.testing.assert_allclose(np.asarray(confidence), confs["topk_margin"], rtol=1e-6, atol=0)
