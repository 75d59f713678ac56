"""`DcjaxLM`: a dcjax model as lm-evaluation-harness's model "dcjax" (docs/lm_eval.md).

  python -m dcjax.lm_eval --model dcjax --tasks <tasks> \\
      --model_args checkpoint=runs/sft:2000,steps=256,max_new_tokens=256,alg=entropy

* `generate_until`: the jitted sampler (dcjax.diffusion.sampler) on batches of `batch_size`
  rows, prompts left-padded to a multiple of 64 tokens (one compiled program per prompt
  bucket); completions cut at the stop tokens, then at `max_gen_toks` tokens, then at the
  first `until` string.
* `loglikelihood`: the Monte-Carlo ELBO of `scoring.py` with `mc_num` mask draws over the
  continuation, and LLaDA's greedy check for `is_greedy` (`is_check_greedy=False` skips it
  and reports False).
* `loglikelihood_rolling`: not implemented (raises).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dcjax.diffusion import decode
from dcjax.diffusion.loading import load_model_and_tokenizer
from dcjax.diffusion.sampler import generate
from dcjax.diffusion.sampler_config import sampler_kwargs, sampler_section, validate_sampler
from dcjax.lm_eval import scoring
from dcjax.parallel import mesh as mesh_lib
from dcjax.parallel.rules import MESH_AXES
from dcjax.parallel.sharding import to_host
from dcjax.train import handoff

log = logging.getLogger(__name__)

PROMPT_BUCKET = 64   # prompts and loglikelihood canvases are padded to a multiple of this
MIN_CONT_BUCKET = 8  # continuation windows: the next power of two, at least this
DEFAULT_BATCH_SIZE = 8
GEN_KWARGS_USED = ("until", "max_gen_toks")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _cont_bucket(n: int) -> int:
  return max(MIN_CONT_BUCKET, 1 << (n - 1).bit_length())


def cut_at_until(text: str, until) -> str:
  """`text` before the earliest occurrence of any (non-empty) stop string."""
  cut = len(text)
  for stop in until:
    if stop:
      at = text.find(stop)
      if at >= 0:
        cut = min(cut, at)
  return text[:cut]


def _batch_size(value) -> int:
  if value is None or value == "" or (isinstance(value, str) and value.startswith("auto")):
    if value:
      log.warning("dcjax: batch_size=%s is not supported; using %d", value, DEFAULT_BATCH_SIZE)
    return DEFAULT_BATCH_SIZE
  size = int(value)
  if size < 1:
    raise ValueError(f"dcjax model_args batch_size={value!r} must be a positive integer")
  return size


@register_model("dcjax")
class DcjaxLM(TemplateLM):
  """lm-eval model over a dcjax checkpoint (`checkpoint=W[:step]`) or a Hugging Face
  directory (`hf_dir=...`). Every `config.sampler` field (steps, alg, temperature, top_p,
  top_k, alg_temp, eps, block_length, threshold, cache, cache_refresh_every,
  max_new_tokens) is a model_arg too; unset ones keep configs' defaults."""

  def __init__(self, checkpoint: str = "", hf_dir: str = "", tokenizer_path: str = "",
               batch_size: Any = DEFAULT_BATCH_SIZE, mc_num: int = 128,
               is_check_greedy: bool = True, seed: int = 0, dtype: str = "",
               max_length: int = 0, fsdp: int = 1, tensor: int = 1,
               device: str | None = None, max_batch_size: int | None = None, **sampler):
    super().__init__()
    del device, max_batch_size  # the mesh decides placement; no automatic batch size
    if bool(checkpoint) == bool(hf_dir):
      raise ValueError("dcjax model_args: give exactly one of checkpoint=W[:step] (a dcjax "
                       "workdir) and hf_dir=DIR (a Hugging Face checkpoint directory)")
    if int(mc_num) < 1:
      raise ValueError(f"dcjax model_args mc_num={mc_num!r} must be >= 1")
    self.section = sampler_section(**sampler)
    validate_sampler(self.section, "dcjax model_args")
    self.sampler = sampler_kwargs(self.section)
    self.mc_num, self.seed = int(mc_num), int(seed)
    self.is_check_greedy = bool(is_check_greedy)
    self.mesh = mesh_lib.make_mesh({"data": -1, "fsdp": int(fsdp), "tensor": int(tensor)})
    shards = int(np.prod([self.mesh.shape[a] for a in MESH_AXES[:2]]))
    self.rows = _round_up(_batch_size(batch_size), shards)  # rows per compiled batch

    model = {}
    if dtype:
      model = dict(dtype=dtype) if checkpoint else dict(dtype=dtype, param_dtype=dtype)
    config = ml_collections.ConfigDict(dict(
        seed=self.seed, hf_dir=hf_dir, checkpoint_dir=checkpoint, tokenizer_path=tokenizer_path,
        model=model))
    source = handoff.open_source(checkpoint, "model_args checkpoint") if checkpoint else None
    self.model_config, self.params, self.tok = load_model_and_tokenizer(config, self.mesh, source)
    self.max_length = int(max_length) or self.model_config.max_position_embeddings
    self.stop_ids = decode.stop_token_ids(self.tok)
    self._root = jax.random.key(self.seed)
    self._calls = 0
    self._warned: set[str] = set()

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    # The CLI always passes its --batch_size (default 1): a batch_size in model_args wins.
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  # --- tokenizer interface -----------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return int(self.tok.eos_id)

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tok, "path", None) or type(self.tok).__name__)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
    del add_special_tokens, kwargs  # dcjax tokenizers add no BOS
    return list(self.tok.encode(string))

  def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

  def _warn_once(self, key: str, message: str) -> None:
    if key not in self._warned:
      self._warned.add(key)
      log.warning(message)

  def _put(self, *arrays):
    batch = NamedSharding(self.mesh, PartitionSpec(MESH_AXES[:2], None))
    return [jax.device_put(np.asarray(a), batch) for a in arrays]

  @staticmethod
  def _left_padded(rows: list[list[int]], length: int, pad: int):
    ids = np.full((len(rows), length), pad, np.int32)
    keep = np.zeros((len(rows), length), bool)
    for r, row in enumerate(rows):
      ids[r, length - len(row):], keep[r, length - len(row):] = row, True
    return ids, keep

  # --- generate_until -----------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    n_new = self.sampler["max_new_tokens"]
    limit = self.max_length - n_new
    if limit < 1:
      raise ValueError(f"dcjax: max_new_tokens={n_new} leaves no room for a prompt within "
                       f"max_length={self.max_length}")
    todo = []
    for index, request in enumerate(requests):
      context, gen_kwargs = request.args
      gen_kwargs = dict(gen_kwargs or {})
      ignored = sorted(set(gen_kwargs) - set(GEN_KWARGS_USED))
      if ignored:
        self._warn_once("gen_kwargs", f"dcjax: ignoring gen_kwargs {ignored}; sampling "
                        f"settings come from model_args ({self.sampler})")
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_gen = int(gen_kwargs.get("max_gen_toks") or n_new)
      if max_gen > n_new:
        self._warn_once("max_gen_toks", f"dcjax: max_gen_toks={max_gen} > max_new_tokens="
                        f"{n_new}; completions have at most {n_new} tokens")
      ids = self.tok_encode(context)[-limit:] or [self.eot_token_id]
      todo.append((index, ids, until, max_gen, request.args))

    results: list[str | None] = [None] * len(todo)
    groups = collections.defaultdict(list)
    for item in todo:
      groups[min(_round_up(len(item[1]), PROMPT_BUCKET), limit)].append(item)
    bar = tqdm(total=len(todo), disable=disable_tqdm, desc="dcjax generate_until")
    for length in sorted(groups):
      items = groups[length]
      for start in range(0, len(items), self.rows):
        chunk = items[start:start + self.rows]
        rows = [c[1] for c in chunk] + [chunk[-1][1]] * (self.rows - len(chunk))
        ids, keep = self._left_padded(rows, length, self.tok.pad_id)
        key = jax.random.fold_in(self._root, self._calls)
        self._calls += 1
        out = generate(self.model_config, self.params, ids, keep, rng=key, mesh=self.mesh,
                       **self.sampler)
        tokens = to_host(out.tokens)[:, length:]
        for (index, _, until, max_gen, args), row in zip(chunk, tokens):
          text = self.tok_decode(decode.cut_at_stop(row, self.stop_ids)[:max_gen])
          results[index] = cut_at_until(text, until)
          self.cache_hook.add_partial("generate_until", args, results[index])
        bar.update(len(chunk))
    bar.close()
    return results

  # --- loglikelihood ------------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del kwargs
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    work = collections.defaultdict(list)  # (L, C) -> [(index, tokens, n)]
    for index, (args, context, cont) in enumerate(requests):
      context, cont = list(context), list(cont)
      if not cont:
        results[index] = (0.0, True)
        continue
      if len(cont) >= self.max_length:
        raise ValueError(f"dcjax: a continuation of {len(cont)} tokens does not fit "
                         f"max_length={self.max_length} with its context")
      context = context[-(self.max_length - len(cont)):]
      cont_len = _cont_bucket(len(cont))
      length = _round_up(max(len(context) + len(cont), cont_len + 1), PROMPT_BUCKET)
      work[(length, cont_len)].append((index, context, cont, args))

    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="dcjax loglikelihood")
    bar.update(len(requests) - sum(len(v) for v in work.values()))
    for (length, cont_len), items in sorted(work.items()):
      elbo = self._elbo(items, length, cont_len)
      greedy = (self._greedy(items, length, cont_len) if self.is_check_greedy
                else [False] * len(items))
      for (index, _, _, args), value, is_greedy in zip(items, elbo, greedy):
        results[index] = (float(value), bool(is_greedy))
        self.cache_hook.add_partial("loglikelihood", args, results[index])
      bar.update(len(items))
    bar.close()
    return results

  def _elbo(self, items, length: int, cont_len: int) -> np.ndarray:
    """Mean over `mc_num` draws of (n / k) * sum of masked-token log-probs, per item."""
    rows = []  # (item position, masked [C], weight)
    for pos, (_, context, cont, _) in enumerate(items):
      n = len(cont)
      masked, weight = scoring.draw_masks(n, self.mc_num,
                                          scoring.request_rng(self.seed, context, cont))
      window = np.zeros((self.mc_num, cont_len), bool)
      window[:, cont_len - n:] = masked
      rows.extend((pos, window[j], weight[j]) for j in range(self.mc_num))
    total = np.zeros(len(items), np.float64)
    for start in range(0, len(rows), self.rows):
      chunk = rows[start:start + self.rows]
      chunk = chunk + [(chunk[0][0], np.zeros(cont_len, bool), 0.0)] * (self.rows - len(chunk))
      ids, keep = self._left_padded([items[p][1] + items[p][2] for p, _, _ in chunk], length,
                                    self.tok.pad_id)
      masked = np.stack([m for _, m, _ in chunk])
      with jax.set_mesh(self.mesh):
        logp = scoring.masked_logps(self.model_config, self.params, *self._put(ids, keep, masked))
      sums = to_host(logp).astype(np.float64).sum(axis=1)
      for (pos, _, weight), value in zip(chunk, sums):
        total[pos] += weight * value
    return total / self.mc_num

  def _greedy(self, items, length: int, cont_len: int) -> list[bool]:
    out = []
    for start in range(0, len(items), self.rows):
      chunk = items[start:start + self.rows]
      chunk = chunk + [chunk[0]] * (self.rows - len(chunk))
      ids, keep = self._left_padded([c[1] + c[2] for c in chunk], length, self.tok.pad_id)
      cont = np.zeros((len(chunk), cont_len), bool)
      for r, c in enumerate(chunk):
        cont[r, cont_len - len(c[2]):] = True
      with jax.set_mesh(self.mesh):
        ok = scoring.greedy_matches(self.model_config, self.params, *self._put(ids, keep, cont))
      out.extend(to_host(ok)[:min(self.rows, len(items) - start)].tolist())
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    raise NotImplementedError(
        "dcjax: loglikelihood_rolling (perplexity tasks such as wikitext) is not implemented: "
        "a masked-diffusion model has no left-to-right token log-probabilities; use "
        "loglikelihood (multiple-choice) or generate_until tasks")
