"""The masked-diffusion loss against hand-computed values (docs/losses.md)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.diffusion import cart as cart_lib
from dcjax.diffusion import forward_process as fp
from dcjax.diffusion import losses

MASK = 7


def _loss(logits, tokens, t, u, cfg, prompt_mask=None):
  batch = losses.as_batch(tokens, prompt_mask)
  b, l = np.shape(tokens)
  noise = fp.Noise(jnp.asarray(t, jnp.float32), jnp.asarray(u, jnp.float32),
                   jnp.full((b,), l, jnp.int32), None)
  prepared = losses.prepare(batch, noise, MASK, cfg)
  sums = losses.loss_sums(jnp.asarray(logits, jnp.float32), prepared)
  return prepared, losses.summarise(sums, losses.normaliser(prepared, cfg))


def _ce(logit_row, label):
  """Cross-entropy written out: log(sum exp) - logit[label]."""
  return math.log(sum(math.exp(z) for z in logit_row)) - logit_row[label]


LOGITS = [[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 1.0], [0.0, 0.0, 3.0]],
          [[0.2, 1.5, -1.0], [1.0, 1.0, 1.0], [0.0, 3.0, 0.0], [2.0, 0.0, 1.0]]]
TOKENS = [[0, 1, 2, 1], [2, 1, 0, 0]]
T = [0.5, 0.25]
# Row 0: u < t at positions 0, 2, 3 (0 is never a target). Row 1: only position 1.
U = [[0.1, 0.9, 0.2, 0.3], [0.5, 0.1, 0.5, 0.5]]


def test_loss_matches_hand_computation_with_shift_and_inverse_t():
  cfg = losses.LossConfig()
  prepared, m = _loss(LOGITS, TOKENS, T, U, cfg)
  # Shift: token i is predicted by the logits at i-1.
  ce_r0_p2 = _ce(LOGITS[0][1], 2)
  ce_r0_p3 = _ce(LOGITS[0][2], 1)
  ce_r1_p1 = _ce(LOGITS[1][0], 1)
  weighted = ce_r0_p2 / 0.5 + ce_r0_p3 / 0.5 + ce_r1_p1 / 0.25
  assert float(m["loss"]) == pytest.approx(weighted / 3, rel=1e-6)
  assert float(m["loss_token_mean"]) == pytest.approx(weighted / 3, rel=1e-6)
  assert float(m["ce_masked"]) == pytest.approx((ce_r0_p2 + ce_r0_p3 + ce_r1_p1) / 3, rel=1e-6)
  # argmax of LOGITS[0][1] is 1 (target 2: wrong), of LOGITS[0][2] is 2 (target 1: wrong),
  # of LOGITS[1][0] is 1 (target 1: right).
  assert float(m["accuracy"]) == pytest.approx(1 / 3)
  np.testing.assert_array_equal(np.asarray(prepared["noisy"]),
                                [[MASK, 1, MASK, MASK], [2, MASK, 0, 0]])


def test_llada_normaliser_divides_by_all_maskable_tokens():
  _, m = _loss(LOGITS, TOKENS, T, U, losses.LossConfig(normaliser="llada"))
  weighted = (_ce(LOGITS[0][1], 2) + _ce(LOGITS[0][2], 1)) / 0.5 + _ce(LOGITS[1][0], 1) / 0.25
  assert float(m["loss"]) == pytest.approx(weighted / 8, rel=1e-6)
  assert float(m["loss_token_mean"]) == pytest.approx(weighted / 3, rel=1e-6)


def test_cart_weights_by_hand():
  p = 0.3
  masked = np.array([[False, True, False, True, True]])
  w = np.asarray(cart_lib.cart_weights(jnp.asarray(masked), jnp.ones_like(masked), p))
  unmasked = [0, 2]
  for n in (1, 3, 4):
    expected = 0.5 * sum(p * (1 - p) ** (abs(n - i) - 1) for i in unmasked)
    assert w[0, n] == pytest.approx(expected, rel=1e-6)


def test_cart_weighting_replaces_inverse_t():
  cfg = losses.LossConfig(weighting="cart", cart_p=0.3)
  _, m = _loss(LOGITS[:1], TOKENS[:1], T[:1], U[:1], cfg)
  # Row 0: masked {0, 2, 3}, unmasked {1}. Targets 2 and 3.
  w2 = 0.5 * 0.3 * 0.7 ** 0
  w3 = 0.5 * 0.3 * 0.7 ** 1
  expected = (w2 * _ce(LOGITS[0][1], 2) + w3 * _ce(LOGITS[0][2], 1)) / 2
  assert float(m["loss"]) == pytest.approx(expected, rel=1e-6)


def test_sft_never_masks_the_prompt_and_pads_are_targets():
  b, l, prompt = 4, 12, 5
  tokens = np.arange(b * l).reshape(b, l) % 6 + 10
  tokens[:, 9:] = 1  # pad tail
  prompt_mask = np.zeros((b, l), bool)
  prompt_mask[:, :prompt] = True
  batch = losses.as_batch(tokens, prompt_mask)
  for seed in range(20):
    noise = fp.draw_noise(jax.random.key(seed), b, l, fp.NoiseConfig(truncate_prob=0.5))
    noise = fp.Noise(noise.t_B, noise.u_BxL, jnp.full((b,), l, jnp.int32), None)
    prepared = losses.prepare(batch, noise, MASK, losses.LossConfig())
    noisy, target = np.asarray(prepared["noisy"]), np.asarray(prepared["target"])
    np.testing.assert_array_equal(noisy[:, :prompt], tokens[:, :prompt])
    assert not target[:, :prompt].any()
  # t -> 1 with u = 0: every response token and every pad is masked and a target.
  noise = fp.Noise(jnp.ones((b,)), jnp.zeros((b, l)), jnp.full((b,), l, jnp.int32), None)
  prepared = losses.prepare(batch, noise, MASK, losses.LossConfig())
  assert np.asarray(prepared["target"])[:, prompt:].all()
  assert (np.asarray(prepared["noisy"])[:, prompt:] == MASK).all()


def test_noise_t_range_and_truncation():
  cfg = fp.NoiseConfig(eps=1e-3, truncate_prob=0.5)
  noise = fp.draw_noise(jax.random.key(0), 2000, 16, cfg)
  t = np.asarray(noise.t_B)
  assert t.min() >= 1e-3 and t.max() <= 1.0
  cut = np.asarray(noise.length_B) < 16
  assert 0.4 < cut.mean() < 0.6  # ~half, minus the draws that picked the full length
  assert np.asarray(noise.length_B).min() >= 1


def test_annealed_attention_mask():
  length, steps = 64, 4
  u = fp.draw_noise(jax.random.key(1), 1, length, fp.NoiseConfig(anneal_steps=steps)).anneal_u_LxL
  causal = np.tril(np.ones((length, length), bool))
  first = np.asarray(fp.annealed_attention_mask(u, fp.anneal_ratio(0, steps)))
  assert first[causal].all()
  upper = first[~causal]
  assert abs(upper.mean() - 0.25) < 0.05  # ratio (0 + 1) / 4
  assert np.asarray(fp.annealed_attention_mask(u, fp.anneal_ratio(steps - 1, steps))).all()


def test_document_mask_and_boundary_targets():
  segments = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  mask = np.asarray(fp.document_attention_mask(segments))[0]
  assert mask[0, 1] and not mask[1, 2] and mask[2, 4] and not mask[5, 5]
  tokens = np.array([[3, 4, 5, 6, 3, 1]])
  batch = dict(losses.as_batch(tokens), segment_ids=segments)
  noise = fp.Noise(jnp.ones((1,)), jnp.zeros((1, 6)), jnp.full((1,), 6, jnp.int32), None)
  prepared = losses.prepare(batch, noise, MASK, losses.LossConfig(document_mask=True))
  # Targets: not position 0, not the first token of document 2, not padding.
  np.testing.assert_array_equal(np.asarray(prepared["target"])[0],
                                [False, True, False, True, True, False])
