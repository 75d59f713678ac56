"""The jitted parallel-unmasking sampler: Dream's `diffusion_generate` (docs/sampler.md) and beyond.

`generate` runs one compiled program: a `lax.fori_loop` over the steps (a `while_loop` for
confidence-threshold decoding, which exits early) whose per-step reveal counts and
probabilities are host-computed arrays (`schedule.py`), so a new prompt of the same padded
shape reuses the compiled program. The jitted function is cached on the static settings.

Per step (t = timesteps[i], s = timesteps[i + 1]):
  1. logits of the active block from the model on the whole canvas (or from a block KV
     cache), shifted (position j reads the output at j - 1);
  2. confidences on Dream's distribution (tempered, top-p/top-k-filtered, the mask token
     included); the proposed token is the best / a sampled one other than the mask token;
  3. reveal: `origin` each masked position with probability 1 - s/t; confidence algorithms
     the k most confident masked positions (k from the schedule; Gumbel top-k with
     `alg_temp`); threshold decoding every masked position whose proposal probability is
     >= threshold plus the single most confident one. Revealed tokens are never re-masked.

Blocks (`block_length`) split the completion into consecutive blocks refined one after the
other; positions outside the active block are never revealed. With a `cache`, the first
step of each block (and every `cache_refresh_every` steps) runs the whole canvas and stores
every layer's K/V; the other steps run only a window: "prefix" the block and everything
after it (K/V of the prefix reused), "dual" only the block (K/V of prefix and suffix
reused). The position just before the window is recomputed too, since its output
predicts the block's first token.

Where dcjax differs from the released torch code (all invisible for trained models and
full canvases, listed so nobody hunts for them):
* the mask token is never proposed (Dream can reveal `<|mask|>`, which then stays masked);
  the confidences still read Dream's distribution, mask token included;
* only the completion is unmasked: mask tokens inside the prompt stay as they are;
* a row reveals at most its own masked count (Dream's top-k with the batch-average k could
  pick already-revealed positions and re-mask them when rows differ);
* proposals and confidences in float32; ties rank the lower position first; a top-p
  cutoff keeps every token tied with the last kept one;
* threshold decoding ranks by the alg's confidence for the "at least one" token and runs
  at most N steps; the block's first step is an ordinary step on whole-canvas logits
  (Fast-dLLM's Dream code force-reveals the block's first position there).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcjax import model as model_lib
from dcjax.diffusion import proposals
from dcjax.diffusion.sampler_inputs import CACHE_MODES, check_options, check_prompts
from dcjax.diffusion.schedule import build_schedule
from dcjax.model import as_model_config
from dcjax.model.config import ModelConfig
from dcjax.parallel.rules import LOGICAL_AXIS_RULES

BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class SampleOutput:
  """What `generate` returns (all jax arrays, batch-sharded like the prompt).

  tokens           int32 [B, P+N]  prompt (left padding kept) followed by the completion
  reveal_step      int32 [B, P+N]  step at which each position was revealed; -1 for the prompt
  num_steps        int32 []        sampler steps run (one model forward each)
  num_full_forwards int32 []       of those, forwards over the whole canvas (cache refreshes)
  step_confidence  float32 [T, B, N] or None  (return_history) the confidence of every
                   masked completion position at each step; -inf where already revealed,
                   NaN for steps not run (threshold decoding's early exit)
  """

  tokens: jax.Array
  reveal_step: jax.Array
  num_steps: jax.Array
  num_full_forwards: jax.Array
  step_confidence: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the compiled program depends on besides array values."""

  config: ModelConfig
  alg: str
  sample: bool
  use_top_p: bool
  top_k: int | None
  use_alg_temp: bool
  threshold_mode: bool
  cache: str | None
  refresh_every: int
  prompt_len: int
  max_new_tokens: int
  block_length: int
  num_blocks: int
  num_steps: int
  return_history: bool
  mesh: Mesh | None


def generate(config: Any, params, prompt_ids_BxP, prompt_mask_BxP=None, *, max_new_tokens: int,
             steps: int, alg: str, temperature: float = 0.0, top_p: float | None = None,
             top_k: int | None = None, alg_temp: float | None = None, eps: float = 1e-3,
             block_length: int | None = None, threshold: float | None = None,
             cache: str | None = None, cache_refresh_every: int = 0, rng: jax.Array | None = None,
             return_history: bool = False, mesh: Mesh | None = None) -> SampleOutput:
  """Fills `max_new_tokens` mask tokens after each left-padded prompt (docs/sampler.md).

  Args:
    config: a ModelConfig (or anything `dcjax.model.as_model_config` takes); its
      `mask_token_id` is the mask.
    params: the model's parameter pytree, used as given (sharded or not; never copied).
    prompt_ids_BxP: int [B, P] left-padded prompts (P >= 1).
    prompt_mask_BxP: [B, P] 1 for real prompt tokens, 0 for left padding (None: all real).
    max_new_tokens: N, the completion length (the whole canvas is filled; no early stop).
    steps: sampler steps (a multiple of the number of blocks); unused with `threshold`.
    alg: 'origin', 'maskgit_plus', 'topk_margin' or 'entropy'.
    temperature: 0 = greedy proposals; > 0 samples the tempered distribution.
    top_p, top_k: proposal filters (Dream's order: top-p, then top-k).
    alg_temp: > 0 samples the revealed positions from softmax(confidence / alg_temp).
    eps: final time of Dream's linspace(1, eps, steps + 1).
    block_length: LLaDA-style semi-autoregressive blocks (divides max_new_tokens).
    threshold: Fast-dLLM decoding: reveal every masked position of the active block whose
      proposal probability is >= threshold, and at least the most confident one; runs until
      the canvas is full (at most N steps).
    cache: None, 'prefix' or 'dual' block KV cache (Fast-dLLM).
    cache_refresh_every: with a cache, also recompute the whole canvas every this many steps
      within a block (0 = only at each block's first step; 1 = every step, cache-free).
    rng: PRNG key, needed when temperature > 0, alg_temp > 0 or alg == 'origin'.
    return_history: also return the per-step confidences.
    mesh: shard the batch over the mesh's ('data', 'fsdp') axes and apply the model's
      logical sharding rules inside (B must divide evenly).
  """
  c = as_model_config(config)
  prompt_ids_BxP, prompt_mask_BxP = check_prompts(prompt_ids_BxP, prompt_mask_BxP)
  static, arrays, scalars, rng = _program_inputs(
      c, prompt_ids_BxP.shape, max_new_tokens=max_new_tokens, steps=steps, alg=alg,
      temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp, eps=eps,
      block_length=block_length, threshold=threshold, cache=cache,
      cache_refresh_every=cache_refresh_every, rng=rng, return_history=return_history,
      mesh=mesh)
  if mesh is not None:
    batch = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
    prompt_ids_BxP = jax.device_put(prompt_ids_BxP, batch)
    prompt_mask_BxP = jax.device_put(prompt_mask_BxP, batch)
    with jax.set_mesh(mesh):
      return _compiled(static)(params, prompt_ids_BxP, prompt_mask_BxP, rng, arrays, scalars)
  return _compiled(static)(params, prompt_ids_BxP, prompt_mask_BxP, rng, arrays, scalars)


def lower(config: Any, abstract_params, batch: int, prompt_len: int, *, mesh: Mesh, **options):
  """The compiled-to-be program `generate` runs for [batch, prompt_len] prompts on `mesh`,
  lowered from abstract parameters (ShapeDtypeStructs with shardings): the compile mode's
  view of the sampler (docs/compile.md). `options` are `generate`'s keyword arguments."""
  c = as_model_config(config)
  options.setdefault("rng", jax.random.key(0))
  static, arrays, scalars, rng = _program_inputs(c, (batch, prompt_len), mesh=mesh, **options)
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
  ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=sharding)
  keep = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=sharding)
  with jax.set_mesh(mesh):
    return _compiled(static).lower(abstract_params, ids, keep, rng, arrays, scalars)


def _program_inputs(c, shape, *, max_new_tokens: int, steps: int, alg: str,
                    temperature: float = 0.0, top_p=None, top_k=None, alg_temp=None,
                    eps: float = 1e-3, block_length=None, threshold=None, cache=None,
                    cache_refresh_every: int = 0, rng=None, return_history: bool = False,
                    mesh=None):
  """(static settings, schedule arrays, option scalars, rng) of one `generate` call."""
  b, p = shape
  if c.mask_token_id is None:
    raise ValueError("config.mask_token_id is None: the sampler needs the mask token id")
  c.check_positions(p + int(max_new_tokens),  # the canvas: padded prompt width + completion
                    f"a {p}-token prompt + max_new_tokens={max_new_tokens}")
  check_options(alg, temperature, top_p, top_k, alg_temp, threshold, cache, cache_refresh_every)
  sample = temperature > 0
  use_alg_temp = alg_temp is not None and alg_temp > 0
  needs_rng = sample or use_alg_temp or alg == "origin"
  if needs_rng and rng is None:
    raise ValueError(f"rng is None but alg={alg!r}, temperature={temperature}, "
                     f"alg_temp={alg_temp} sample at random: pass rng=jax.random.key(seed)")
  if rng is None:
    rng = jax.random.key(0)
  sched = build_schedule(max_new_tokens, steps, block_length=block_length, eps=eps,
                         threshold=threshold, cache_refresh_every=cache_refresh_every)
  if mesh is not None:
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if b % shards:
      raise ValueError(f"prompt_ids_BxP has batch {b}, not divisible by the mesh's data x fsdp "
                       f"size {shards}")

  static = _Static(
      config=c, alg=alg, sample=sample, use_top_p=top_p is not None and top_p < 1,
      top_k=None if top_k is None else int(top_k), use_alg_temp=use_alg_temp,
      threshold_mode=threshold is not None, cache=cache, refresh_every=int(cache_refresh_every),
      prompt_len=p, max_new_tokens=int(max_new_tokens), block_length=sched.block_length,
      num_blocks=sched.num_blocks, num_steps=sched.num_steps, return_history=return_history,
      mesh=mesh)
  # Host numpy (replicated on every device / process): values, not compile-time constants.
  scalars = np.asarray([temperature if sample else 1.0, top_p if top_p is not None else 1.0,
                        alg_temp if use_alg_temp else 1.0,
                        threshold if threshold is not None else 1.0], np.float32)
  arrays = (sched.block_of_step, sched.reveal_count, sched.transfer_prob, sched.refresh)
  return static, arrays, scalars, rng


@functools.lru_cache(maxsize=64)
def _compiled(static: _Static):
  return jax.jit(functools.partial(_sample, static))


# ----------------------------------------------------------------------------- the program


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


def _sample(st: _Static, params, prompt_ids_BxP, prompt_mask_BxP, rng, arrays, scalars):
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    return _Program(st, params, prompt_mask_BxP, rng, arrays, scalars).run(prompt_ids_BxP)


class _Program:
  """The traced sampler: state is a dict carried through the loops."""

  def __init__(self, st: _Static, params, prompt_mask_BxP, rng, arrays, scalars):
    self.st, self.c, self.params, self.rng = st, st.config, params, rng
    self.block_of_step, self.reveal_count, self.transfer_prob, self.refresh = arrays
    self.temperature, self.top_p, self.alg_temp, self.threshold = (scalars[i] for i in range(4))
    b, p = prompt_mask_BxP.shape
    n = st.max_new_tokens
    self.b, self.p, self.n, self.l = b, p, n, p + n
    self.keep_BxL = _constrain(
        jnp.concatenate([prompt_mask_BxP, jnp.ones((b, n), bool)], axis=1),
        ("activation_batch", "activation_length"))
    self.positions_BxL = model_lib.keep_positions(self.keep_BxL)

  # -- state
  def init_state(self, prompt_ids_BxP):
    st, b, n = self.st, self.b, self.n
    canvas = jnp.concatenate(
        [prompt_ids_BxP, jnp.full((b, n), self.c.mask_token_id, jnp.int32)], axis=1)
    state = {
        "canvas": _constrain(canvas, ("activation_batch", "activation_length")),
        "reveal": _constrain(jnp.full((b, self.l), -1, jnp.int32),
                             ("activation_batch", "activation_length")),
        "step": jnp.zeros((), jnp.int32),
        "full": jnp.zeros((), jnp.int32),
        "prev_block": jnp.full((), -1, jnp.int32),
        "since_refresh": jnp.zeros((), jnp.int32),
    }
    if st.cache is not None:
      shape = (self.c.num_layers, b, self.l, self.c.num_kv_heads, self.c.head_dim)
      zeros = _constrain(jnp.zeros(shape, jnp.dtype(self.c.dtype)),
                         (None, "activation_batch", "activation_length", "activation_kv_heads",
                          "head_dim"))
      state["cache"] = model_lib.KVCache(zeros, zeros)
    if st.return_history:
      state["history"] = _constrain(jnp.full((st.num_steps, b, n), jnp.nan, jnp.float32),
                                    (None, "activation_batch", "activation_length"))
    return state

  def run(self, prompt_ids_BxP):
    st = self.st
    state = self.init_state(prompt_ids_BxP)
    static_blocks = st.cache == "prefix"  # its window length depends on the block
    if st.threshold_mode:
      if static_blocks:
        for blk in range(st.num_blocks):
          state = jax.lax.while_loop(functools.partial(self._block_unfinished, blk),
                                     functools.partial(self._threshold_step, blk), state)
      else:
        state = jax.lax.while_loop(self._unfinished, self._threshold_step_any_block, state)
    else:
      if static_blocks:
        spb = st.num_steps // st.num_blocks
        for blk in range(st.num_blocks):
          state = jax.lax.fori_loop(blk * spb, (blk + 1) * spb,
                                    functools.partial(self._fixed_step, blk), state)
      else:
        state = jax.lax.fori_loop(0, st.num_steps, functools.partial(self._fixed_step, None),
                                  state)
    return SampleOutput(tokens=state["canvas"], reveal_step=state["reveal"],
                        num_steps=state["step"], num_full_forwards=state["full"],
                        step_confidence=state.get("history"))

  # -- loop drivers
  def _fixed_step(self, static_block, i, state):
    blk = self.block_of_step[i] if static_block is None else static_block
    return self._step(state, blk, self.refresh[i])

  def _masked_blocks(self, state):
    gen = state["canvas"][:, self.p:] == self.c.mask_token_id
    return gen.reshape(self.b, self.st.num_blocks, self.st.block_length).any(axis=(0, 2))

  def _unfinished(self, state):
    return (state["step"] < self.st.num_steps) & self._masked_blocks(state).any()

  def _block_unfinished(self, blk, state):
    return (state["step"] < self.st.num_steps) & self._masked_blocks(state)[blk]

  def _threshold_step_any_block(self, state):
    blk = jnp.argmax(self._masked_blocks(state)).astype(jnp.int32)  # leftmost unfinished
    return self._threshold_step(blk, state)

  def _threshold_step(self, blk, state):
    refresh = blk != state["prev_block"]
    if self.st.refresh_every > 0:
      refresh = refresh | (state["since_refresh"] >= self.st.refresh_every)
    return self._step(state, blk, refresh)

  # -- one step
  def _step(self, state, blk, refresh):
    st, c = self.st, self.c
    bl = st.block_length
    start = self.p + blk * bl
    logits_BxWxV, state = self._block_logits(state, start, refresh)

    i = state["step"]
    k_tok, k_pos = jax.random.split(jax.random.fold_in(self.rng, i))
    tokens_BxW = jax.lax.dynamic_slice_in_dim(state["canvas"], start, bl, axis=1)
    masked_BxW = tokens_BxW == c.mask_token_id
    proposal, confidence, prob = proposals.propose(
        logits_BxWxV, k_tok if st.sample else None, alg=st.alg,
        temperature=self.temperature if st.sample else None,
        top_p=self.top_p if st.use_top_p else None, top_k=st.top_k,
        forbidden_token=c.mask_token_id)
    confidence = jnp.where(masked_BxW, confidence, -jnp.inf)

    if st.alg == "origin":
      u = jax.random.uniform(k_pos, masked_BxW.shape, jnp.float32)
      reveal_BxW = masked_BxW & (u < self.transfer_prob[i])
    else:
      score = proposals.position_scores(confidence, masked_BxW, k_pos if st.use_alg_temp else None,
                                        self.alg_temp if st.use_alg_temp else None)
      rank = proposals.descending_rank(score)
      if st.threshold_mode:
        reveal_BxW = masked_BxW & ((prob >= self.threshold) | (rank == 0))
      else:
        reveal_BxW = masked_BxW & (rank < self.reveal_count[i])

    new_tokens = jnp.where(reveal_BxW, proposal, tokens_BxW)
    old_reveal = jax.lax.dynamic_slice_in_dim(state["reveal"], start, bl, axis=1)
    new_reveal = jnp.where(reveal_BxW, i, old_reveal)
    state = dict(state)
    state["canvas"] = jax.lax.dynamic_update_slice_in_dim(state["canvas"], new_tokens, start, 1)
    state["reveal"] = jax.lax.dynamic_update_slice_in_dim(state["reveal"], new_reveal, start, 1)
    if st.return_history:
      row = jnp.full((self.b, self.n), -jnp.inf, jnp.float32)
      row = jax.lax.dynamic_update_slice_in_dim(row, confidence, start - self.p, 1)
      state["history"] = state["history"].at[i].set(row)
    state["step"] = i + 1
    state["prev_block"] = jnp.asarray(blk, jnp.int32)
    state["since_refresh"] = jnp.where(refresh, 1, state["since_refresh"] + 1)
    return state

  def _block_logits(self, state, start, refresh):
    """Logits at [start - 1, start + bl - 1) (they predict the block): the whole canvas on a
    refresh (storing every layer's K/V when caching), else only a window over the cache."""
    st, c, bl = self.st, self.c, self.st.block_length
    state = dict(state)

    def full(cache):
      new_cache, logits = model_lib.forward(
          c, self.params, state["canvas"], self.positions_BxL,
          model_lib.masks.keep_segments(self.keep_BxL), collect_kv=cache is not None,
          logits_start=start - 1, logits_length=bl)
      return logits, new_cache

    if st.cache is None:
      logits, _ = full(None)
      state["full"] = state["full"] + 1
      return logits, state

    width = bl + 1 if st.cache == "dual" else self.l - start + 1

    def windowed(cache):
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start - 1, width, axis=1)
      return model_lib.forward(
          c, self.params, sl(state["canvas"]), sl(self.positions_BxL),
          model_lib.masks.Segments(sl(self.keep_BxL).astype(jnp.int32),
                                   self.keep_BxL.astype(jnp.int32)), cache=cache,
          cache_start=start - 1, collect_kv=True, logits_length=bl)[::-1]

    logits, state["cache"] = jax.lax.cond(refresh, full, windowed, state["cache"])
    state["full"] = state["full"] + refresh.astype(jnp.int32)
    return logits, state

