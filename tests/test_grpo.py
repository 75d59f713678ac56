"""Coupled-GRPO pieces checked against hand computations (docs/grpo.md): estimator passes, loss,
advantages, completion masks, prompts and the prompt iterator, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.config import ConfigError, base_config
from dcjax.diffusion import sampler_config
from dcjax.model import ModelConfig
from dcjax.rl import advantages as adv_lib
from dcjax.rl import grpo_config, logprobs, prompts, synthetic
from dcjax.rl import loss as loss_lib
from dcjax.rl.rollout import completion_mask
from dcjax.train import optim

MASK, V, B, P, N = 15, 16, 3, 4, 6


def fake_apply_factory(calls):
  """A context-dependent stand-in for model.apply that records its inputs."""
  w1 = jax.random.normal(jax.random.key(1), (V, V))
  w2 = jax.random.normal(jax.random.key(2), (V, V))

  def fake_apply(config, params, tokens_BxL, attention_mask=None, positions=None, rows=None,
                 wanted=None):
    del config, positions
    calls.append((np.asarray(tokens_BxL), attention_mask))
    x = params["scale"] * w1[tokens_BxL]
    out = x + jnp.cumsum(w2[tokens_BxL], axis=1) / 4.0
    out = out if rows is None else out[:, rows[0]:rows[0] + rows[1]]  # model.hidden's rows
    # and its zeros where not wanted: a scored position left out turns its log-prob wrong
    return out if wanted is None else jnp.where(wanted[..., None], out, 0.0)

  return fake_apply


@pytest.fixture
def seq():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, MASK, (B, P + N)), jnp.int32)


def np_lp(logits_BxLxV, tokens_BxL):
  """log p(token) of the completion through the shift, in float64 numpy."""
  z = np.asarray(logits_BxLxV, np.float64)[:, P - 1:P + N - 1]
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  tgt = np.asarray(tokens_BxL)[:, P:]
  return np.take_along_axis(logp, tgt[..., None], -1)[..., 0]


# The fake "hidden states" are the fake logits and the LM head is the identity; the head runs
# in chunks of 2 of the N = 6 completion positions (model.head).
HEAD_CONFIG = ModelConfig(vocab_size=V, hidden_size=V, intermediate_size=4, num_layers=1,
                          num_heads=1, num_kv_heads=1, head_dim=2, logits_chunk=2)


def fake_params(scale=1.0):
  return {"scale": jnp.float32(scale), "lm_head": {"kernel": jnp.eye(V, dtype=jnp.float32)}}


def run_estimator(monkeypatch, seq, cfg, key=jax.random.key(3)):
  calls = []
  monkeypatch.setattr(logprobs.model_lib, "hidden", fake_apply_factory(calls))
  noise = logprobs.draw_noise(key, B, N, cfg)
  params = fake_params()
  logp, ent = logprobs.per_token_logps(HEAD_CONFIG, params, seq, noise, cfg, MASK,
                                       with_entropy=True)
  # One forward of all passes, row b's pass p at row b * P + p: split it back into passes.
  assert len(calls) == 1
  tokens, attention = calls[0]
  passes = tokens.shape[0] // B
  assert tokens.shape[0] == B * passes
  calls = [(tokens.reshape(B, passes, -1)[:, p], attention) for p in range(passes)]
  return calls, noise, np.asarray(logp), ent, params


def test_coupled_three_passes_match_spec(monkeypatch, seq):
  cfg = logprobs.EstimatorConfig("coupled", num_pairs=1)
  calls, noise, logp, ent, params = run_estimator(monkeypatch, seq, cfg)
  assert len(calls) == 3
  for tokens, attention in calls:
    np.testing.assert_array_equal(tokens[:, :P], np.asarray(seq)[:, :P])  # prompt never masked
    assert attention is None                                               # none given: no mask
  t = np.asarray(noise.t_BxK)[:, 0]
  u = np.asarray(noise.u_BxKxN)[:, 0]
  assert ((t >= 0.2) & (t <= 0.8)).all()
  masked = [tokens[:, P:] == MASK for tokens, _ in calls]
  assert masked[0].all()                                                 # full-mask pass
  np.testing.assert_array_equal(masked[1], u < t[:, None])
  np.testing.assert_array_equal(masked[2], u >= t[:, None])
  np.testing.assert_array_equal(masked[1] ^ masked[2], np.ones((B, N), bool))  # complements
  np.testing.assert_array_equal(calls[1][0][:, P:][~masked[1]], np.asarray(seq)[:, P:][~masked[1]])
  # Each token from the pass where it is masked, weighted 1/t or 1/(1-t) (docs/grpo.md formula).
  lp = [np_lp(fake_apply_factory([])(None, params, jnp.asarray(tok)), seq) for tok, _ in calls]
  expected = 0.5 * (lp[0] + np.where(u < t[:, None], lp[1] / t[:, None],
                                     lp[2] / (1 - t[:, None])))
  np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)
  assert ent.shape == (B, N) and np.all(np.asarray(ent) > 0)


def test_pass_coefficients_zero_where_visible():
  for kind, passes in (("coupled", 5), ("decoupled", 5), ("full", 1)):
    cfg = logprobs.EstimatorConfig(kind, num_pairs=2)
    noise = logprobs.draw_noise(jax.random.key(0), B, N, cfg)
    masked, coef = (np.asarray(x) for x in logprobs.passes(noise, cfg))
    assert masked.shape == coef.shape == (passes, B, N)
    assert (coef[~masked] == 0).all() and (coef[masked] > 0).all()
  cfg = logprobs.EstimatorConfig("coupled", num_pairs=2)
  noise = logprobs.draw_noise(jax.random.key(0), B, N, cfg)
  masked, coef = (np.asarray(x) for x in logprobs.passes(noise, cfg))
  t = np.asarray(noise.t_BxK)
  for k in range(2):  # pair k: passes 1 + 2k, 2 + 2k; weights averaged over the 2 pairs
    np.testing.assert_array_equal(masked[1 + 2 * k] ^ masked[2 + 2 * k], np.ones((B, N), bool))
    np.testing.assert_allclose(coef[1 + 2 * k][masked[1 + 2 * k]],
                               np.broadcast_to(0.25 / t[:, k:k + 1], (B, N))[masked[1 + 2 * k]],
                               rtol=1e-6)
    np.testing.assert_allclose(
        coef[2 + 2 * k][masked[2 + 2 * k]],
        np.broadcast_to(0.25 / (1 - t[:, k:k + 1]), (B, N))[masked[2 + 2 * k]], rtol=1e-6)
  np.testing.assert_allclose(coef[0], 0.5)


def test_decoupled_masks_are_independent_and_full_is_one_pass(monkeypatch, seq):
  cfg = logprobs.EstimatorConfig("decoupled", num_pairs=1, t_min=0.5, t_max=0.5)
  calls, noise, logp, _, params = run_estimator(monkeypatch, seq, cfg)
  masked = [tokens[:, P:] == MASK for tokens, _ in calls]
  u = np.asarray(noise.u_BxKxN)
  np.testing.assert_array_equal(masked[1], u[:, 0] < 0.5)
  np.testing.assert_array_equal(masked[2], u[:, 1] < 0.5)
  lp = [np_lp(fake_apply_factory([])(None, params, jnp.asarray(tok)), seq) for tok, _ in calls]
  expected = 0.5 * (lp[0] + masked[1] * lp[1] / 0.5 + masked[2] * lp[2] / 0.5)
  np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)

  calls, _, logp, _, params = run_estimator(monkeypatch, seq, logprobs.EstimatorConfig("full"))
  assert len(calls) == 1 and (calls[0][0][:, P:] == MASK).all()
  np.testing.assert_allclose(logp, np_lp(fake_apply_factory([])(None, params,
                                                                jnp.asarray(calls[0][0])), seq),
                             rtol=1e-5, atol=1e-5)


def test_same_key_same_estimate_other_key_differs(monkeypatch, seq):
  cfg = logprobs.EstimatorConfig("coupled")
  a = run_estimator(monkeypatch, seq, cfg, jax.random.key(7))[2]
  b = run_estimator(monkeypatch, seq, cfg, jax.random.key(7))[2]
  c = run_estimator(monkeypatch, seq, cfg, jax.random.key(8))[2]
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("kind,passes", [("full", 1), ("coupled", 3)])
def test_attention_mask_option_passes_keep_mask(monkeypatch, seq, kind, passes):
  """Each row's keep-mask goes with each of its passes (rows b * P + p)."""
  calls = []
  monkeypatch.setattr(logprobs.model_lib, "hidden", fake_apply_factory(calls))
  cfg = logprobs.EstimatorConfig(kind, attention_mask=True)
  keep = jnp.ones((B, P + N), bool).at[0, 0].set(False).at[1, :2].set(False)
  logprobs.per_token_logps(HEAD_CONFIG, fake_params(), seq,
                           logprobs.draw_noise(jax.random.key(0), B, N, cfg), cfg, MASK,
                           keep_BxL=keep)
  np.testing.assert_array_equal(np.asarray(calls[0][1]), np.repeat(np.asarray(keep), passes, 0))


def test_grpo_loss_matches_hand_computation():
  logp = np.array([[-0.6, -2.0, -0.5], [-0.3, -1.2, -2.5]], np.float32)
  old = np.array([[-1.1, -1.0, -0.5], [-1.3, -1.0, -2.0]], np.float32)
  ref = np.array([[-0.9, -2.2, -0.7], [-0.4, -1.0, -2.4]], np.float32)
  adv = np.array([1.5, -0.7], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  eps_lo, eps_hi, beta = 0.2, 0.3, 0.05
  cfg = loss_lib.PolicyLossConfig(epsilon_low=eps_lo, epsilon_high=eps_hi, beta=beta)
  loss, sums = loss_lib.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref),
                                  jnp.asarray(adv), jnp.asarray(mask), cfg)
  # by hand, float64
  total, clipped, kl_sum = 0.0, 0, 0.0
  for i in range(2):
    for j in range(3):
      if not mask[i, j]:
        continue
      r = np.exp(np.float64(logp[i, j]) - old[i, j])
      rc = min(max(r, 1 - eps_lo), 1 + eps_hi)
      a = np.float64(adv[i])
      d = np.float64(ref[i, j]) - logp[i, j]
      kl = np.exp(d) - d - 1
      total += -min(r * a, rc * a) + beta * kl
      kl_sum += kl
      clipped += int((r < 1 - eps_lo and a < 0) or (r > 1 + eps_hi and a > 0))
  assert clipped == 2  # (0,0) r > 1 + eps, A > 0 and (1,2) r < 1 - eps, A < 0; not (1,0)
  np.testing.assert_allclose(float(loss), total / 5, rtol=1e-6)
  np.testing.assert_allclose(float(sums["kl"]), kl_sum, rtol=1e-6)
  assert float(sums["clipped"]) == clipped and float(sums["tokens"]) == 5
  # beta = 0 ignores the reference entirely
  loss0, _ = loss_lib.grpo_loss(jnp.asarray(logp), jnp.asarray(old), None, jnp.asarray(adv),
                                jnp.asarray(mask), loss_lib.PolicyLossConfig(eps_lo, eps_hi, 0.0))
  np.testing.assert_allclose(float(loss0), total / 5 - beta * kl_sum / 5, rtol=1e-6)


def test_on_policy_ratio_is_exactly_one_and_gradient_is_policy_gradient():
  logp = jnp.array([[-1.0, -2.0], [-0.3, -1.2]])
  adv = jnp.array([2.0, -1.0])
  mask = jnp.array([[1, 1], [1, 0]], bool)
  cfg = loss_lib.PolicyLossConfig(beta=0.0)
  loss, sums = loss_lib.grpo_loss(logp, None, None, adv, mask, cfg)
  assert float(sums["ratio"]) == float(sums["tokens"]) == 3.0   # ratio exactly 1 per token
  np.testing.assert_allclose(float(loss), -(2 + 2 - 1) / 3, rtol=1e-6)
  grad = jax.grad(lambda lp: loss_lib.grpo_loss(lp, None, None, adv, mask, cfg)[0])(logp)
  np.testing.assert_allclose(np.asarray(grad), [[-2 / 3, -2 / 3], [1 / 3, 0]], rtol=1e-6)


def test_advantages():
  r = np.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
  mean = adv_lib.group_advantages(r, 4)
  np.testing.assert_allclose(mean, [-2, -1, 0, 3, 0, 0, 0, 0])
  loo = adv_lib.group_advantages(r, 4, "loo")
  np.testing.assert_allclose(loo[:4], [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2], rtol=1e-6)
  scaled = adv_lib.group_advantages(r, 4, scale=True)
  np.testing.assert_allclose(scaled[:4], mean[:4] / (np.std(r[:4], ddof=1) + 1e-4), rtol=1e-6)
  assert (scaled[4:] == 0).all()
  assert adv_lib.zero_variance_fraction(r, 4) == 0.5
  with pytest.raises(ValueError, match="num_generations"):
    adv_lib.group_advantages(r, 3)
  with pytest.raises(ValueError, match="config.rl.advantage"):
    adv_lib.group_advantages(r, 4, "median")


def test_completion_mask_up_to_and_including_first_end():
  comp = jnp.array([[5, 6, 3, 7, 3], [5, 5, 5, 5, 5], [3, 1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(completion_mask(comp, 3)),
                                [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


class CharTokenizer:
  """Characters as ids (ChatML markers as single ids) for prompt tests."""

  pad_id, eos_id, mask_id, chat_end_id, im_start_id = 0, 0, 1, 2, 3

  def apply_chat_template(self, messages, add_generation_prompt=True, system_prompt=None):
    from dcjax.data.tokenizer import Tokenizer
    return Tokenizer.apply_chat_template(self, messages, add_generation_prompt, system_prompt)

  def encode(self, text):
    text = text.replace("<|im_start|>", "\x03").replace("<|im_end|>", "\x02")
    return [ord(ch) for ch in text]


def test_prompt_construction_and_left_truncation():
  tests = ["assert f(1) == 2", "assert f(2) == 3"]
  assert prompts.build_question("Add one.", tests) == "Add one.\nTest cases: assert f(1) == 2"
  stub = "Complete:\n```\ndef f(x):\n```\n"
  assert prompts.build_question(stub, tests) == stub
  assert prompts.build_question("Add one.", tests, add_first_test=False) == "Add one."
  tok = CharTokenizer()
  text = prompts.prompt_text(tok, dict(question="Add one.", tests=tests), "Sys.")
  assert text == ("<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nAdd one.\nTest cases: "
                  "assert f(1) == 2<|im_end|>\n<|im_start|>assistant\n")
  ids = prompts.encode_prompt(tok, text, 20)
  np.testing.assert_array_equal(ids, tok.encode(text)[-20:])   # the start is cut


def test_prompt_iterator_collate_and_checkpoint_state():
  tasks = synthetic.synthetic_tasks(10, seed=1)
  tok = CharTokenizer()
  ds = prompts.prompt_dataset(tasks, tok, batch_size=3, seed=0, max_len=200,
                              system_prompt=None)
  it = iter(ds)
  first = next(it)
  state = it.get_state()
  second = next(it)
  ids, mask, index = prompts.collate(second, pad_multiple=16)
  assert ids.shape[1] % 16 == 0 and ids.shape[1] >= second["length"].max()
  for row, m, i in zip(ids, mask, index):
    want = tok.encode(prompts.prompt_text(tok, tasks[i], None))
    np.testing.assert_array_equal(row[m], want)
    assert (row[~m] == tok.pad_id).all() and m[-1]
  assert sorted(set(first["index"]) | set(second["index"])) == sorted(
      set(first["index"].tolist() + second["index"].tolist()))
  resumed = iter(ds)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["index"], second["index"])
  # each epoch visits every task once
  it = iter(prompts.prompt_dataset(tasks, tok, batch_size=5, seed=3, max_len=200,
                                   system_prompt=None))
  seen = np.concatenate([next(it)["index"], next(it)["index"]])
  assert sorted(seen.tolist()) == list(range(10))


def test_synthetic_tasks_solutions_pass_their_asserts():
  for task in synthetic.synthetic_tasks(20, seed=2):
    scope = {}
    exec(task["solution"], scope)  # pylint: disable=exec-used
    for test in task["tests"]:
      exec(test, scope)  # pylint: disable=exec-used


def test_mbpp_train_split(mbpp_path):
  tasks = prompts.load_mbpp_tasks(str(mbpp_path), "601-974")
  assert len(tasks) == 374
  assert all(t["tests"] and t["question"] and t["solution"] for t in tasks)
  assert tasks[0]["tests"][0].startswith("assert")


def test_config_validation_names_fields():
  cfg = grpo_config.add_grpo_sections(base_config())
  cfg.prompts.path = "x.jsonl"
  cfg.prompts.tokenizer = "tok.model"
  grpo_config.validate(cfg)
  bad = [("rl", "num_generations", 1, "config.rl.num_generations"),
         ("rl", "estimator", "paired", "config.rl.estimator"),
         ("rl", "micro_batches", 3, "config.rl.micro_batches"),
         ("rl", "t_max", 0.1, "config.rl.t_min"),
         ("sampler", "alg", "greedy", "config.sampler.alg"),
         ("prompts", "path", "", "config.prompts.path")]
  for section, field, value, message in bad:
    c = grpo_config.add_grpo_sections(base_config())
    c.prompts.path, c.prompts.tokenizer = "x.jsonl", "tok.model"
    c[section][field] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
      grpo_config.validate(c)
  kwargs = sampler_config.sampler_kwargs(cfg.sampler)
  assert kwargs["temperature"] == 1.2 and kwargs["top_p"] == 0.95 and kwargs["alg"] == "entropy"
  assert kwargs["top_k"] is None and kwargs["block_length"] is None and kwargs["cache"] is None


def test_optimizer_defaults_decay_mask_and_reference_refresh():
  from dcjax.rl import learner as learner_lib  # pylint: disable=import-outside-toplevel
  defaults = grpo_config.add_grpo_sections(base_config()).optim
  tx, schedule = optim.make_optimizer(defaults, 100)  # docs/grpo.md: cosine to 10%, no warmup
  np.testing.assert_allclose(float(schedule(0)), 1e-6, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 1e-7, rtol=1e-5)
  params = {"layers": {"q_proj": {"kernel": jnp.ones((2, 3, 3)), "bias": jnp.ones((2, 3))},
                       "input_layernorm": {"weight": jnp.ones((2, 3))}},
            "embed_tokens": {"embedding": jnp.ones((5, 3))}}
  mask = optim.decay_mask(params)
  assert mask["layers"]["q_proj"] == {"kernel": True, "bias": False}
  assert not mask["layers"]["input_layernorm"]["weight"] and mask["embed_tokens"]["embedding"]
  # Weight decay 0.1 at lr 1e-6 with a zero gradient: only decayed leaves move.
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert float(updates["layers"]["q_proj"]["bias"].max()) == 0.0
  np.testing.assert_allclose(np.asarray(updates["layers"]["q_proj"]["kernel"]), -1e-7, rtol=1e-5)

  cfg = learner_lib.LearnerConfig(ref_update="soft", ref_mix_alpha=0.6)
  lrn = learner_lib.Learner(None, cfg, tx, schedule, mask_id=0)
  st = learner_lib.RLState(step=jnp.int32(0), params={"w": jnp.full(3, 2.0)}, opt_state=(),
                           ref_params={"w": jnp.full(3, 7.0)}, rng=jnp.zeros(2, jnp.uint32))
  np.testing.assert_allclose(np.asarray(lrn._refresh_fn(st).ref_params["w"]), 0.6 * 2 + 0.4 * 7)
  hard = learner_lib.Learner(None, learner_lib.LearnerConfig(), tx, schedule, mask_id=0)
  np.testing.assert_array_equal(np.asarray(hard._refresh_fn(st).ref_params["w"]), 2.0)
