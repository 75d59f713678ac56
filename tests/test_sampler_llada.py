"""The jitted sampler's LLaDA options against a torch port of LLaDA's `generate`, run on
transformers' Qwen2 (bidirectional attention, Dream's shift) with the same weights.

Greedy runs with classifier-free guidance, random remasking (the uniform draws replayed in
the port), and the EOS options must be token-identical, padded rows included.
"""

import dataclasses

import jax
import numpy as np
import pytest

from dcjax.diffusion import proposals
from dcjax.diffusion.sampler import generate
from dcjax.model import hf
from tests.hf_reference import bidirectional_logits, random_qwen2
from tests.llada_reference import llada_generate
from tests.test_sampler_dream import MASK, MODEL, _prompts

N, BLOCK = 24, 8
NEAR_TIE = 1e-5  # two implementations of the model: a gap this small could flip on rounding

_STATE = {}


def _setup(tmp_path_factory):
  """(transformers model as LLaDA's mask predictor, dcjax config, params), made once."""
  if not _STATE:
    reference = random_qwen2(seed=11, scale=0.5, **MODEL)
    path = tmp_path_factory.mktemp("llada")
    reference.save_pretrained(path)
    config, params = hf.load_pretrained(str(path))

    def predictor(tokens, keep, positions):  # Dream's shift: logits[:, j] predicts token j
      logits = bidirectional_logits(reference, tokens, keep, positions)
      return np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)

    _STATE.update(predictor=predictor, config=dataclasses.replace(config, mask_token_id=MASK),
                  params=params)
  return _STATE["predictor"], _STATE["config"], _STATE["params"]


def _end_tokens(tmp_path_factory):
  """The two tokens a plain greedy run proposes most: EOS and EOT stand-ins that matter."""
  if "ends" not in _STATE:
    _, config, params = _setup(tmp_path_factory)
    ids, keep = _prompts()
    out = generate(config, params, ids, keep, max_new_tokens=N, steps=N, alg="maskgit_plus",
                   block_length=BLOCK)
    values, counts = np.unique(np.asarray(out.tokens)[:, ids.shape[1]:], return_counts=True)
    _STATE["ends"] = tuple(int(v) for v in values[np.argsort(-counts, kind="stable")[:2]])
  return _STATE["ends"]


def _uniforms(key, steps, rows, p):
  """dcjax's alg='random' draws, laid out on the port's [B, L] canvas (block by block)."""
  spb = steps // (N // BLOCK)

  def at(step):
    u = np.zeros((rows, p + N), np.float32)
    lo = p + (step // spb) * BLOCK
    u[:, lo:lo + BLOCK] = np.asarray(proposals.random_confidence(key, step, (rows, BLOCK)))
    return u
  return at


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    dict(cfg_scale=1.0),
    dict(cfg_scale=0.5, steps=12),
    dict(alg="random"),
    dict(alg="random", cfg_scale=2.0, steps=12),
    dict(logits_eos_inf=True, confidence_eos_eot_inf=True),
], ids=["cfg1", "cfg0.5-2perstep", "random", "random-cfg2", "eos-eot"])
def test_greedy_equals_llada_generate(tmp_path_factory, options):
  predictor, config, params = _setup(tmp_path_factory)
  options = dict(options)
  steps = options.pop("steps", N)
  alg = options.pop("alg", "maskgit_plus")
  ids, keep = _prompts()
  p = ids.shape[1]
  port = dict(cfg_scale=options.get("cfg_scale", 0.0),
              remasking="random" if alg == "random" else "low_confidence")
  if "logits_eos_inf" in options:
    eos, eot = _end_tokens(tmp_path_factory)
    config = dataclasses.replace(config, eos_token_id=eos)
    options["end_token_ids"] = (eos, eot)
    port.update(logits_eos_inf=True, confidence_eos_eot_inf=True, eos_id=eos, end_ids=(eos, eot))
  key = jax.random.key(4)
  out = generate(config, params, ids, keep, max_new_tokens=N, steps=steps, alg=alg,
                 block_length=BLOCK, rng=key, **options)
  want, want_reveal, gap = llada_generate(
      predictor, ids, keep, mask_id=MASK, gen_length=N, steps=steps, block_length=BLOCK,
      uniforms=_uniforms(key, steps, len(ids), p), **port)
  if alg != "random":
    assert gap > NEAR_TIE, gap  # no choice in either run is decided by rounding
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_array_equal(np.asarray(out.reveal_step), want_reveal)
  assert int(out.num_full_forwards) == steps * (2 if options.get("cfg_scale") else 1)
  if "logits_eos_inf" in options:
    assert not (tokens[:, p:] == config.eos_token_id).any()
  if options.get("cfg_scale"):  # guidance changed the result
    plain = generate(config, params, ids, keep, max_new_tokens=N, steps=steps, alg=alg,
                     block_length=BLOCK, rng=key)
    assert not np.array_equal(np.asarray(plain.tokens), tokens)
