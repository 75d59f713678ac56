"""Coupled-GRPO scoring is batch-invariant by default: a completion's per-token log-probs do
not depend on the prompts it is batched with or on the pad multiple."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.config import ConfigError, base_config
from dcjax.model import ModelConfig
from dcjax.rl import grpo_config, logprobs
from tests.test_sampler import random_params

MASK, PAD, N = 95, 0, 6
CONFIG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e6,
                     mask_token_id=MASK)


def _score(cfg, prompts, completion, pad_to):
  """Per-token log-probs of `completion` after each prompt, left-padded to `pad_to`;
  every row gets the same noise (t, u)."""
  rows = [[PAD] * (pad_to - len(p)) + list(p) + list(completion) for p in prompts]
  tokens = jnp.asarray(rows, jnp.int32)
  keep = jnp.asarray([[False] * (pad_to - len(p)) + [True] * (len(p) + N) for p in prompts])
  one = logprobs.draw_noise(jax.random.key(5), 1, N, cfg)
  noise = logprobs.MaskNoise(t_BxK=jnp.repeat(one.t_BxK, len(prompts), 0),
                             u_BxKxN=jnp.repeat(one.u_BxKxN, len(prompts), 0))
  logp, _ = logprobs.per_token_logps(CONFIG, random_params(CONFIG, seed=2), tokens, noise, cfg,
                                     MASK, keep_BxL=keep)
  return np.asarray(logp)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["coupled", "decoupled", "full"])
def test_default_scoring_is_batch_invariant(kind):
  rng = np.random.default_rng(0)
  prompt = rng.integers(2, 90, 5)
  longer = [rng.integers(2, 90, 11), rng.integers(2, 90, 9)]
  completion = rng.integers(2, 90, N)
  cfg = logprobs.EstimatorConfig(kind)
  assert cfg.attention_mask  # the default
  alone = _score(cfg, [prompt], completion, pad_to=5)[0]
  beside_longer = _score(cfg, [longer[0], prompt, longer[1]], completion, pad_to=11)[1]
  pad_multiple_32 = _score(cfg, [prompt], completion, pad_to=32)[0]
  np.testing.assert_allclose(beside_longer, alone, atol=1e-5, rtol=0)
  np.testing.assert_allclose(pad_multiple_32, alone, atol=1e-5, rtol=0)
  # The release's scoring (no mask) depends on the padding: the check above can fail.
  release = logprobs.EstimatorConfig(kind, attention_mask=False)
  assert np.abs(_score(release, [prompt], completion, pad_to=32)[0]
                - _score(release, [prompt], completion, pad_to=5)[0]).max() > 1e-3


def test_release_scoring_requires_padding_to_the_longest():
  c = grpo_config.add_grpo_sections(base_config())
  c.prompts.path, c.prompts.tokenizer = "x.jsonl", "tok.model"
  c.rl.logp_attention_mask = False
  c.prompts.pad_multiple = 1
  grpo_config.validate(c)  # the release's scoring
  c.prompts.pad_multiple = 32
  with pytest.raises(ConfigError,
                     match=r"config\.prompts\.pad_multiple=32 would change every log-prob"):
    grpo_config.validate(c)
