"""The lm-eval model "dcjax" (dcjax/lm_eval; docs/lm_eval.md).

Fast: the Monte-Carlo ELBO estimator against the exact expectation, enumerated over every
mask of a 3-token continuation with the plain model forward; LLaDA's greedy check against a
Python loop. Slow: tiny local lm-eval tasks (one generate_until, one multiple choice, JSONL
data via `dataset_path: json`, found through include_path) run end to end on a 1-step train
run's checkpoint through `simple_evaluate`, and on its Hugging Face export through
`python -m dcjax.lm_eval` in a subprocess; their numbers are checked against direct
computations with the model and the sampler.
"""

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if os.environ.get("CI") != "true":  # the test extra has lm-eval: CI must not skip
  pytest.importorskip("lm_eval")

from dcjax import model as model_lib  # noqa: E402
from dcjax.data.tokenizer import load_tokenizer  # noqa: E402
from dcjax.diffusion import decode  # noqa: E402
from dcjax.diffusion.sampler import generate  # noqa: E402
from dcjax.lm_eval import scoring  # noqa: E402
from dcjax.lm_eval.model import cut_at_until  # noqa: E402
from dcjax.model import hf  # noqa: E402
from dcjax.model.config import ModelConfig  # noqa: E402
from dcjax.modes import export as export_mode  # noqa: E402
from dcjax.modes import train as train_mode  # noqa: E402
from dcjax.train import handoff  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.tiny_train import tiny_train_config  # noqa: E402

MASK = 4


def _peaky_model():
  """A random 1-layer model whose LM head is scaled up: sharp, context-dependent predictions
  (a plain random init predicts nearly uniformly, which any weighting would match)."""
  config = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=10_000.0,
                       mask_token_id=MASK, pad_token_id=1, eos_token_id=1)
  params = model_lib.init_params(config, jax.random.key(7))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 40.0
  params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 20.0
  return config, params


def _ref_logps(config, params, seq, masked_positions):
  """log p(seq[i]) for i in masked_positions, seq with those positions masked: one unpadded
  forward of the plain model, shifted by hand (position i reads output i - 1)."""
  noisy = np.array(seq, np.int32)
  noisy[list(masked_positions)] = config.mask_token_id
  logits = np.asarray(model_lib.apply(config, params, jnp.asarray(noisy[None])), np.float64)[0]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return {i: logp[i - 1, seq[i]] for i in masked_positions}


def _exact_elbo(config, params, context, cont):
  """(sum_k 1/k E_{|M|=k}[sum_{i in M} log p], mean over k of the variance of one draw
  (n/k) S(M) given k): every mask enumerated, each scored by a plain forward."""
  seq, n = list(context) + list(cont), len(cont)
  start = len(context)
  mean, within = 0.0, 0.0
  for k in range(1, n + 1):
    values = [(n / k) * sum(_ref_logps(config, params, seq, subset).values())
              for subset in itertools.combinations(range(start, start + n), k)]
    mean += np.mean(values) / n
    within += np.var(values) / n
  return mean, within


def _canvas(rows, length, pad=1):
  ids = np.full((len(rows), length), pad, np.int32)
  keep = np.zeros((len(rows), length), bool)
  for r, row in enumerate(rows):
    ids[r, length - len(row):], keep[r, length - len(row):] = row, True
  return ids, keep


def test_mask_draws_are_stratified_and_weighted():
  masked, weight = scoring.draw_masks(3, 6, np.random.default_rng(0))
  k = masked.sum(axis=1)
  assert sorted(k.tolist()) == [1, 1, 2, 2, 3, 3]  # every k in 1..n equally often
  np.testing.assert_allclose(weight, 3 / k)
  # Same request tokens and seed: same draws, whatever else was drawn before.
  a = scoring.draw_masks(5, 4, scoring.request_rng(3, [9, 8], [7, 6]))
  b = scoring.draw_masks(5, 4, scoring.request_rng(3, [9, 8], [7, 6]))
  c = scoring.draw_masks(5, 4, scoring.request_rng(4, [9, 8], [7, 6]))
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])


def test_elbo_estimate_approaches_the_exact_expectation():
  config, params = _peaky_model()
  context, cont = [10, 11, 12, 13], [20, 21, 22]
  exact, within = _exact_elbo(config, params, context, cont)
  assert within > 0.1, "the test model must make masks matter"

  # mc_num a multiple of n: every k is drawn equally often, so only the choice of positions
  # within each k is random; 9 left pads, which must be invisible.
  mc_num, cont_len, length = 3000, 8, 16
  masked, weight = scoring.draw_masks(3, mc_num, scoring.request_rng(0, context, cont))
  window = np.zeros((mc_num, cont_len), bool)
  window[:, cont_len - 3:] = masked
  ids, keep = _canvas([context + cont] * mc_num, length)
  logp = np.asarray(scoring.masked_logps(config, params, ids, keep, window), np.float64)

  # Each draw's masked log-probs equal the unpadded forward's for the same mask.
  seq = context + cont
  for j in range(0, mc_num, 491):
    ref = _ref_logps(config, params, seq, [4 + i for i in np.flatnonzero(masked[j])])
    np.testing.assert_allclose(logp[j, cont_len - 3:][masked[j]], list(ref.values()),
                               rtol=1e-4, atol=1e-4)
  estimate = float(np.mean(weight * logp.sum(axis=1)))
  tolerance = 5 * math.sqrt(within / mc_num)
  unweighted = float(np.mean(logp.sum(axis=1)))  # what forgetting the n/k weight gives
  print(f"ELBO exact {exact:.4f}, estimate {estimate:.4f} (mc_num {mc_num}, tolerance "
        f"{tolerance:.4f}); without the n/k weight {unweighted:.4f}")
  assert abs(estimate - exact) < tolerance
  assert abs(unweighted - exact) > 5 * tolerance


def _greedy_reference(config, params, context, n):
  """Decode n tokens one per step (argmax without the mask token; most confident first)."""
  seq = list(context) + [config.mask_token_id] * n
  for _ in range(n):
    logits = np.asarray(model_lib.apply(config, params, jnp.asarray([seq])), np.float64)[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    best = None
    for i in range(len(context), len(seq)):
      if seq[i] == config.mask_token_id:
        row = logits[i - 1].copy()
        row[config.mask_token_id] = -np.inf
        token = int(np.argmax(row))
        if best is None or probs[i - 1, token] > best[0]:
          best = (probs[i - 1, token], i, token)
    seq[best[1]] = best[2]
  return seq[len(context):]


def test_greedy_check_matches_a_python_loop():
  config, params = _peaky_model()
  contexts = [[10, 11, 12], [13, 14, 15, 16, 17], [18, 19]]
  greedy = [_greedy_reference(config, params, c, 3) for c in contexts]
  wrong = [g[:1] + [(g[1] + 1) % 32 if (g[1] + 1) % 32 != MASK else 5] + g[2:] for g in greedy]
  rows = [c + g for c, g in zip(contexts, greedy)] + [c + w for c, w in zip(contexts, wrong)]
  rows.append([10, 11, 12] + greedy[0][:2])  # a 2-token continuation: its greedy prefix
  two = _greedy_reference(config, params, [10, 11, 12], 2)
  ids, keep = _canvas(rows, 16)
  cont = np.zeros((len(rows), 8), bool)
  cont[:, -3:] = True
  cont[-1, :] = False
  cont[-1, -2:] = True
  ok = np.asarray(scoring.greedy_matches(config, params, ids, keep, cont))
  assert ok[:3].all() and not ok[3:6].any()
  assert ok[6] == (two == greedy[0][:2])


# ---------------------------------------------------------------------------- end to end

JSON_DIR = os.path.join(sysconfig.get_paths()["stdlib"], "json")
GEN_DOCS = [{"prompt": "def add(a, b):\n    return", "answer": " a + b"},
            {"prompt": "import json\nimport os\n" * 4 + "x = json.", "answer": "loads"},
            {"prompt": "print(", "answer": "1)"}]
MC_DOCS = [{"question": "The json module", "choices": [" decodes", " encodes text", " is"],
            "label": 0},
           {"question": "def f(x):\n    return", "choices": [" x", " None"], "label": 1},
           {"question": "", "choices": ["import os", "import json"], "label": 1}]
MAX_GEN_TOKS = 5
UNTIL = ["\n\n", "("]


def _write_tasks(root):
  """Two lm-eval tasks over local JSONL files (no hub access)."""
  os.makedirs(root, exist_ok=True)
  cache = os.path.join(root, "hf-datasets-cache")
  for name, docs in (("gen", GEN_DOCS), ("mc", MC_DOCS)):
    with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)
  common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{path}}\n"
            f"  cache_dir: {cache}\ntest_split: test\n")
  with open(os.path.join(root, "dcjax_tiny_gen.yaml"), "w") as f:
    f.write("task: dcjax_tiny_gen\n" + common.format(path=os.path.join(root, "gen.jsonl")) +
            "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
            "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n"
            f"  until: {json.dumps(UNTIL)}\n  max_gen_toks: {MAX_GEN_TOKS}\n"
            "  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")
  with open(os.path.join(root, "dcjax_tiny_mc.yaml"), "w") as f:
    f.write("task: dcjax_tiny_mc\n" + common.format(path=os.path.join(root, "mc.jsonl")) +
            "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
            "doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: ''\n"
            "metric_list:\n  - metric: acc\n")
  return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 1-step train run's workdir (sentencepiece tokenizer) and its Hugging Face export."""
  workdir = str(tmp_path_factory.mktemp("lm_eval_run"))
  c = tiny_train_config(1)
  c.data.update(dict(stdlib_root=JSON_DIR, eval_docs=1, seq_len=32, shuffle_window=0,
                     tokenizer_vocab_size=512, tokenizer_train_chars=100_000))
  c.checkpoint.update(dict(interval=1, keep=1, async_save=False))
  train_mode.train(c, workdir)
  c.mode, c.export_dir = "export", str(tmp_path_factory.mktemp("lm_eval_hf"))
  export_mode.export(c, workdir)
  tasks = _write_tasks(str(tmp_path_factory.mktemp("lm_eval_tasks")))
  return workdir, c.export_dir, tasks


def _split(tok, context, cont):
  """lm-eval's TemplateLM split: empty context -> eos; trailing context spaces move over."""
  if not context:
    ids = tok.encode(cont)
    return ([tok.eos_id], ids) if ids[0] != tok.eos_id else (ids[:1], ids[1:])
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, cont = context[:-spaces], context[-spaces:] + cont
  whole, ctx = tok.encode(context + cont), tok.encode(context)
  return ctx, whole[len(ctx):]


def _reference_loglikelihood(config, params, tok, context, cont, *, seed, mc_num, max_length):
  ctx, cnt = _split(tok, context, cont)
  ctx = ctx[-(max_length - len(cnt)):]
  masked, weight = scoring.draw_masks(len(cnt), mc_num, scoring.request_rng(seed, ctx, cnt))
  scores = [w * sum(_ref_logps(config, params, ctx + cnt,
                               [len(ctx) + i for i in np.flatnonzero(m)]).values())
            for m, w in zip(masked, weight)]
  return float(np.mean(scores))


def _check_mc(samples, config, params, tok, *, seed, mc_num, max_length, greedy_checked):
  assert len(samples) == len(MC_DOCS)
  for sample in samples:
    doc = sample["doc"]
    assert len(sample["resps"]) == len(doc["choices"])
    for choice, resp in zip(doc["choices"], sample["resps"]):
      value, is_greedy = resp[0]
      expected = _reference_loglikelihood(config, params, tok, doc["question"], choice,
                                          seed=seed, mc_num=mc_num, max_length=max_length)
      np.testing.assert_allclose(float(value), expected, rtol=1e-4, atol=1e-3)
      assert float(value) < 0
      assert is_greedy in (True, False, "True", "False")  # the CLI's samples file: strings
      assert greedy_checked or is_greedy in (False, "False")
    lls = [float(r[0][0]) for r in sample["resps"]]
    assert sample["acc"] == float(int(np.argmax(lls)) == doc["label"])


def _check_gen(samples):
  assert len(samples) == len(GEN_DOCS)
  for sample in samples:
    text = sample["resps"][0][0]
    assert isinstance(text, str)
    assert not any(u in text for u in UNTIL)
    assert sample["exact_match"] in (0.0, 1.0)


@pytest.mark.slow
def test_simple_evaluate_on_a_workdir_checkpoint(run):
  import lm_eval  # pylint: disable=import-outside-toplevel
  import lm_eval.api.registry  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

  workdir, _, tasks = run
  args = dict(checkpoint=f"{workdir}:1", steps=4, alg="maskgit_plus", max_new_tokens=8,
              temperature=0.7, top_p=0.9, block_length=4, mc_num=6, seed=3, batch_size=12,
              is_check_greedy=True, dtype="bfloat16", fsdp=2)
  # As simple_evaluate(model="dcjax", model_args=args, batch_size=1) builds it (the CLI
  # always passes its --batch_size, default 1): the batch_size in model_args wins.
  lm = lm_eval.api.registry.get_model("dcjax").create_from_arg_obj(
      args, {"batch_size": 1, "max_batch_size": None, "device": None})
  assert lm.rows == 16  # 12 rounded up to the 8 data x fsdp shards
  assert dict(lm.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert lm.model_config.dtype == "bfloat16"
  out = lm_eval.simple_evaluate(model=lm, tasks=["dcjax_tiny_gen", "dcjax_tiny_mc"],
                                task_manager=TaskManager(include_path=tasks), log_samples=True)
  results = out["results"]
  assert 0.0 <= results["dcjax_tiny_mc"]["acc,none"] <= 1.0
  assert 0.0 <= results["dcjax_tiny_gen"]["exact_match,none"] <= 1.0
  source = handoff.open_source(workdir, "test")
  tok = load_tokenizer(source.tokenizer_path)
  params = source.load_params()
  config = dataclasses.replace(source.model_config, dtype="bfloat16")
  _check_mc(out["samples"]["dcjax_tiny_mc"], config, params, tok, seed=3, mc_num=6,
            max_length=config.max_position_embeddings, greedy_checked=True)
  _check_gen(out["samples"]["dcjax_tiny_gen"])


@pytest.mark.slow
def test_cli_on_a_hugging_face_export(run, tmp_path):
  """`python -m dcjax.lm_eval --model dcjax ...`: greedy completions equal the sampler's on
  each prompt alone (left-truncated to max_length - max_new_tokens), and the loglikelihoods
  the direct computation with the same draws."""
  _, hf_dir, tasks = run
  max_length, n_new, steps = 24, 8, 8
  model_args = (f"hf_dir={hf_dir},temperature=0,steps={steps},max_new_tokens={n_new},"
                f"alg=topk_margin,mc_num=4,seed=1,batch_size=2,is_check_greedy=False,"
                f"max_length={max_length}")
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "dcjax.lm_eval", "--model", "dcjax", "--model_args", model_args,
       "--tasks", "dcjax_tiny_gen,dcjax_tiny_mc", "--include_path", tasks,
       "--output_path", str(tmp_path / "out"), "--log_samples"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs]
  result_file = [f for f in files if os.path.basename(f).startswith("results_")]
  assert len(result_file) == 1, files
  with open(result_file[0]) as f:
    results = json.load(f)["results"]
  assert 0.0 <= results["dcjax_tiny_mc"]["acc,none"] <= 1.0

  def samples(task):
    [path] = [f for f in files if os.path.basename(f).startswith(f"samples_{task}_")]
    with open(path) as f:
      return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])

  tok = load_tokenizer(hf_dir)
  config, params = hf.load_pretrained(hf_dir)
  config = dataclasses.replace(config, mask_token_id=tok.mask_id)
  _check_mc(samples("dcjax_tiny_mc"), config, params, tok, seed=1, mc_num=4,
            max_length=max_length, greedy_checked=False)
  gen = samples("dcjax_tiny_gen")
  _check_gen(gen)
  truncated, longer = 0, 0
  for sample in gen:
    ids = tok.encode(sample["doc"]["prompt"])
    truncated += len(ids) > max_length - n_new
    ids = ids[-(max_length - n_new):]
    out = generate(config, params, np.asarray([ids], np.int32), max_new_tokens=n_new,
                   steps=steps, alg="topk_margin", temperature=0.0)
    row = decode.cut_at_stop(np.asarray(out.tokens)[0, len(ids):], decode.stop_token_ids(tok))
    longer += len(row) > MAX_GEN_TOKS
    text = tok.decode(row[:MAX_GEN_TOKS], skip_special_tokens=True)
    assert sample["resps"][0][0] == cut_at_until(text, UNTIL)
  assert truncated == 1  # the long prompt exercised max_length
  assert longer >= 1  # and max_gen_toks cut a completion
