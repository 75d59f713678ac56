"""The fused clip + AdamW update against optax's own chain (dcjax/train/optim.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dcjax.train import optim


def _section(grad_clip):
  # Every hyper-parameter off its config default.
  return ml_collections.ConfigDict(dict(lr=3e-3, b1=0.8, b2=0.97, adam_eps=1e-6,
                                        weight_decay=0.2, warmup_steps=2, end_lr_ratio=0.1,
                                        grad_clip=grad_clip))


@pytest.mark.parametrize("grad_clip", [0.5, 0.0, 1e6])
def test_fused_update_equals_optax_chain(grad_clip):
  fused, _ = optim.make_optimizer(_section(grad_clip), 10)
  reference, _ = optim.make_optimizer(_section(grad_clip), 10, fused=False)
  key = jax.random.key(0)
  params = {"layers": {"kernel": jax.random.normal(key, (3, 4, 5)), "bias": jnp.ones((3, 5)),
                       "norm": {"scale": jnp.full((3, 4), 1.5)}},
            "embed": {"embedding": jax.random.normal(jax.random.key(1), (7, 4))}}
  sf, sr = fused.init(params), reference.init(params)
  pf = pr = params
  clipped = []
  for i in range(6):
    scale = 3.0 if i % 2 == 0 else 0.01  # above and below the clipping threshold
    g = jax.tree.map(lambda x, i=i, scale=scale:
                     scale * jax.random.normal(jax.random.fold_in(key, i), x.shape), params)
    clipped.append(float(optax.tree.norm(g)) > grad_clip > 0)
    uf, sf = jax.jit(fused.update)(g, sf, pf)
    ur, sr = jax.jit(reference.update)(g, sr, pr)
    pf, pr = optax.apply_updates(pf, uf), optax.apply_updates(pr, ur)
    assert jax.tree.structure(sf) == jax.tree.structure(sr)
    for a, b in zip(jax.tree.leaves((uf, pf, sf)), jax.tree.leaves((ur, pr, sr))):
      # float32 rounding: the clipped gradient is g * (clip / norm) here, (g / norm) * clip
      # in optax, so updates of size ~1e-2 may differ by a few of their last bits
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
  if grad_clip == 0.5:
    assert any(clipped) and not all(clipped)
  # The update moved the parameters, with weight decay on kernels / embeddings only.
  assert not np.allclose(pf["layers"]["kernel"], params["layers"]["kernel"])
  zero = jax.tree.map(jnp.zeros_like, params)
  # Zero gradients after the warm-up's first (zero-rate) step: only weight decay moves kernels
  # and embeddings; biases and norm scales have none.
  state = fused.init(params)
  for _ in range(3):
    u, state = fused.update(zero, state, params)
  assert float(jnp.max(jnp.abs(u["layers"]["kernel"]))) > 0
  assert float(jnp.max(jnp.abs(u["embed"]["embedding"]))) > 0
  assert float(jnp.max(jnp.abs(u["layers"]["bias"]))) == 0
  assert float(jnp.max(jnp.abs(u["layers"]["norm"]["scale"]))) == 0
