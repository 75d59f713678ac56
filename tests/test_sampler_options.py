"""Infilling helpers, `early_stop`, threshold infilling and the text-level `generate_texts`.

Token identity of infilling, CFG, random remasking and the EOS options against the torch ports
of Dream's and LLaDA's loops is in test_sampler_dream.py / test_sampler_llada.py.
"""

import dataclasses

import numpy as np
import pytest

from dcjax.diffusion import canvas, decode
from dcjax.diffusion.sampler import generate
from dcjax.diffusion.text import generate_texts
from tests.test_sampler import CONFIG, MASK, PAD, left_padded_prompts, random_params

N = 16


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG)


@pytest.fixture(scope="module")
def prompts():
  return left_padded_prompts(3, pads=(0, 2, 0, 5))


def _finish_steps(tokens, reveal, p, ends):
  """From a run without early stop: the first step after which each row's completion holds an
  end token with no mask before it (-1: never)."""
  steps = []
  for row in range(len(tokens)):
    finish = -1
    for i in range(int(reveal[row].max()) + 1):
      state = np.where((reveal[row] >= 0) & (reveal[row] <= i) | (reveal[row] < 0),
                       tokens[row], MASK)[p:]
      end = np.flatnonzero(np.isin(state, ends))
      if len(end) and not (state[:end[0]] == MASK).any():
        finish = i
        break
    steps.append(finish)
  return np.asarray(steps)


@pytest.mark.parametrize("block_length", [4, None])
def test_early_stop_freezes_finished_rows(params, prompts, block_length):
  ids, keep = prompts
  p = ids.shape[1]
  kwargs = dict(max_new_tokens=N, steps=N, alg="maskgit_plus", block_length=block_length)
  full = generate(CONFIG, params, ids, keep, **kwargs)
  tokens, reveal = np.asarray(full.tokens), np.asarray(full.reveal_step)
  ends = tuple(sorted(set(tokens[:, p + 1].tolist())))  # every row has one near its start
  finish = _finish_steps(tokens, reveal, p, ends)
  assert (finish >= 0).all() and finish.max() < N - 1, finish
  out = generate(CONFIG, params, ids, keep, early_stop=True, end_token_ids=ends, **kwargs)
  got, got_reveal = np.asarray(out.tokens), np.asarray(out.reveal_step)
  assert int(out.num_steps) == finish.max() + 1 < N  # the loop exits when every row is done
  for row, f in enumerate(finish):
    before = reveal[row] <= f  # the prompt (-1) and everything revealed up to the finish step
    np.testing.assert_array_equal(got[row, before], tokens[row, before])
    np.testing.assert_array_equal(got_reveal[row, before], reveal[row, before])
    np.testing.assert_array_equal(got[row, ~before], CONFIG.pad_token_id)  # padding after
    np.testing.assert_array_equal(got_reveal[row, ~before], f)


def test_threshold_infilling_fills_every_mask(params, prompts):
  ids, keep = prompts
  ids = ids.copy()
  ids[:, 3:5] = MASK  # masks inside every row (row 3's real tokens start at column 5)
  ids[3, 3:5] = PAD
  out = generate(CONFIG, params, ids, keep, max_new_tokens=8, steps=8, alg="entropy",
                 threshold=0.5, return_history=True)
  tokens = np.asarray(out.tokens)
  assert (tokens != MASK).all()
  given = np.concatenate([ids != MASK, np.zeros((4, 8), bool)], axis=1)
  np.testing.assert_array_equal(tokens[:, :6][given[:, :6]], ids[given[:, :6]])
  assert ((np.asarray(out.reveal_step) >= 0) == ~given).all()
  assert np.asarray(out.step_confidence).shape == (14, 4, 14)  # one block over the canvas
  assert int(out.num_steps) < 2 + 8  # threshold decoding revealed several at a step


@pytest.mark.parametrize("change,match", [
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(cfg_scale=1.0, block_length=8, cache="dual"), "cfg_scale"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(early_stop=True, end_token_ids=()), "end_token_ids"),
    (dict(alg="random"), "rng"),
    (dict(prompt_masked=True, block_length=8), "infilling"),
])
def test_bad_new_options_raise_naming_them(params, prompts, change, match):
  ids, keep = prompts
  config = dataclasses.replace(CONFIG, eos_token_id=None)
  if change.pop("prompt_masked", False):
    ids = np.where(np.arange(6) == 5, MASK, ids)
  args = dict(max_new_tokens=N, steps=8, alg="entropy")
  args.update(change)
  with pytest.raises(ValueError, match=match):
    generate(config, params, ids, keep, **args)


# ----------------------------------------------------------------------------- text level


@pytest.fixture(scope="module")
def tok():
  return decode.ByteTokenizer()


def test_canvas_helpers(tok):
  m = tok.mask_id
  assert canvas.infill_text("ab", "c", 2) == "ab<|mask|><|mask|>c"
  assert canvas.encode_with_masks(tok, "ab<|mask|><|mask|>c") == [97, 98, m, m, 99]
  assert canvas.encode_with_masks(tok, "<|mask|>") == [m]
  ids, keep = canvas.encode_canvases(tok, ["x<|mask|>", "<|mask|>yz"])
  np.testing.assert_array_equal(ids, [[tok.pad_id, 120, m], [m, 121, 122]])
  np.testing.assert_array_equal(keep, [[False, True, True], [True, True, True]])
  filled = np.where(ids == m, 65, ids)
  assert canvas.filled_texts(tok, filled, keep) == ["xA", "Ayz"]


def test_generate_texts_infills_and_completes(tok):
  config = dataclasses.replace(CONFIG, vocab_size=264, mask_token_id=tok.mask_id,
                               pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
  prm = random_params(config, seed=2)
  texts = ["ab<|mask|><|mask|><|mask|>cd", "xyz"]
  got = generate_texts(config, prm, tok, texts, max_new_tokens=4, steps=4, alg="entropy")
  # The same call by hand: the plain text gets its 4 masks written out, one infilling canvas.
  ids, keep = canvas.encode_canvases(tok, [texts[0], "xyz" + "<|mask|>" * 4])
  out = np.asarray(generate(config, prm, ids, keep, max_new_tokens=0, steps=4, alg="entropy",
                            end_token_ids=decode.stop_token_ids(tok)).tokens)
  assert got[0] == tok.decode(out[0][keep[0]])
  assert got[0].startswith("ab") and got[0].endswith("cd")
  assert got[1] == tok.decode(decode.cut_at_stop(out[1, -4:], decode.stop_token_ids(tok)),
                              skip_special_tokens=True)
  plain = generate_texts(config, prm, tok, ["xyz"], max_new_tokens=4, steps=4, alg="entropy",
                         cfg_scale=1.0)
  ids, keep = decode.encode_left_padded(tok, ["xyz"])
  want = generate(config, prm, ids, keep, max_new_tokens=4, steps=4, alg="entropy",
                  cfg_scale=1.0, end_token_ids=decode.stop_token_ids(tok))
  assert plain == decode.decode_completions(tok, np.asarray(want.tokens), 3)
