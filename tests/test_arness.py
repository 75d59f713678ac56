"""Decoding-order analysis (docs/evaluation.md): AR-ness@k, step-0 confidence, plots."""

import numpy as np
import pytest

from dcjax.eval.arness import (arness_curves, confidence_curve, confidence_from_logits,
                               global_arness, local_arness, reveal_order)
from dcjax.eval.plots import plot_arness, plot_confidence_curve


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_left_to_right_scores_one(k):
  steps = np.arange(12)
  assert local_arness(steps, k) == 1.0
  assert global_arness(steps, k) == 1.0


def test_known_permutation_by_hand():
  # Six positions revealed in the order 0, 1, 4, 5, 2, 3 (steps[pos] = when it came).
  steps = np.array([0, 1, 4, 5, 2, 3])
  np.testing.assert_array_equal(reveal_order(steps), [0, 1, 4, 5, 2, 3])
  # local@1, steps t = 1..5 (5 of them): is p_{t-1} == p_t - 1?
  #   t=1: 0 -> 1 yes; t=2: 1 -> 4 no; t=3: 4 -> 5 yes; t=4: 5 -> 2 no; t=5: 2 -> 3 yes.
  assert local_arness(steps, 1) == pytest.approx(3 / 5)
  # local@2, t = 2..5 (4 of them): both p_{t-1} == p_t - 1 and p_{t-2} == p_t - 2?
  #   t=2 (4): 1, 0 no; t=3 (5): 4 yes but 1 != 3; t=4 (2): 5 no; t=5 (3): 2 yes, 5 != 1.
  assert local_arness(steps, 2) == 0.0
  # global@k, all 6 steps: how many still-masked positions lie left of p_t?
  #   t=0: p=0 of {0..5} -> 0;  t=1: p=1 of {1..5} -> 0;  t=2: p=4 of {2,3,4,5} -> 2;
  #   t=3: p=5 of {2,3,5} -> 2; t=4: p=2 of {2,3} -> 0;   t=5: p=3 of {3} -> 0.
  assert global_arness(steps, 1) == pytest.approx(4 / 6)
  assert global_arness(steps, 2) == pytest.approx(4 / 6)
  assert global_arness(steps, 3) == 1.0


def test_right_to_left():
  steps = np.arange(6)[::-1]  # position 5 first
  assert local_arness(steps, 1) == 0.0  # every step goes one to the left
  # p_t = 5 - t has 5 - t masked positions to its left: only the last step hits.
  assert global_arness(steps, 1) == pytest.approx(1 / 6)


def test_ties_negatives_and_batches():
  # Two positions per step are read left to right: still left-to-right decoding.
  assert local_arness(np.array([0, 0, 1, 1, 2, 2]), 2) == 1.0
  # Negative entries (prompt, padding) are left out.
  assert global_arness(np.array([-1, -1, 0, 1, 2]), 1) == 1.0
  batch = np.stack([np.arange(6), np.arange(6)[::-1]])
  assert local_arness(batch, 1) == pytest.approx(0.5)
  assert global_arness(batch, 1) == pytest.approx((1 + 1 / 6) / 2)
  curves = arness_curves(batch, ks=(1, 2))
  assert curves["k"] == [1, 2] and curves["local"][0] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="k must be a positive integer"):
    local_arness(batch, 0)
  with pytest.raises(ValueError, match="integer array"):
    global_arness(np.zeros((2, 2, 2), dtype=np.int32), 1)


def test_confidence_from_logits_by_hand():
  uniform = np.zeros((1, 2))  # two tokens, p = (0.5, 0.5)
  assert confidence_from_logits(uniform, "entropy")[0] == pytest.approx(np.log(0.5), abs=1e-8)
  assert confidence_from_logits(uniform, "maskgit_plus")[0] == pytest.approx(0.5)
  assert confidence_from_logits(uniform, "topk_margin")[0] == pytest.approx(0.0)
  logits = np.log(np.array([[0.5, 0.3, 0.2]]))
  # top_p = 0.6 keeps 0.5 and 0.3 (0.3 is the token that crosses 0.6): (0.625, 0.375, 0).
  assert confidence_from_logits(logits, "maskgit_plus", top_p=0.6)[0] == pytest.approx(0.625)
  assert confidence_from_logits(logits, "topk_margin", top_p=0.6)[0] == pytest.approx(0.25)
  # Temperature 0.5 squares the probabilities before renormalising.
  sq = np.array([0.25, 0.09, 0.04]) / 0.38
  assert confidence_from_logits(logits, "maskgit_plus", temperature=0.5)[0] == \
      pytest.approx(sq[0])


def test_confidence_curve_and_plots(tmp_path):
  conf = np.array([[-0.1, -1.0, -2.0, -2.1], [-0.3, -1.2, -2.2, 9.0]])
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)
  curve = confidence_curve(conf, valid)
  np.testing.assert_allclose(curve, [-0.2, -1.1, -2.1, -2.1])
  png1 = plot_confidence_curve({"temp 0.2": curve}, str(tmp_path / "conf.png"))
  steps = np.stack([np.arange(16), np.random.default_rng(0).permutation(16)])
  png2 = plot_arness({"AR": arness_curves(steps[:1], (1, 2, 4)),
                      "mixed": arness_curves(steps, (1, 2, 4))}, str(tmp_path / "ar.png"))
  import matplotlib.image
  for path in (png1, png2):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 200 and width > 300
