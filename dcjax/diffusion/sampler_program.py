"""The traced body of `dcjax.diffusion.sampler.generate` (docs/sampler.md): one compiled program
per `Static`, whose loop state is a dict carried through `lax.fori_loop` / `while_loop`.

The canvas is the left-padded prompt followed by `max_new_tokens` mask tokens. The *region*
is the part of the canvas the sampler may write: the appended completion, split into blocks
of `block_length`, or, when the prompt itself holds mask tokens (infilling), the whole canvas
as one block. Each step reads the logits of the active block (shifted: position j reads the
model's output at j - 1; position 0 its own output, as Dream's loop), proposes a token and a
confidence for every masked position of the block, and reveals some of them.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dcjax import model as model_lib
from dcjax.diffusion import proposals
from dcjax.model.config import ModelConfig
from dcjax.parallel.rules import LOGICAL_AXIS_RULES

BATCH_AXES = ("data", "fsdp")
NUM_SCALARS = 5  # temperature, top_p, alg_temp, threshold, cfg_scale


@flax.struct.dataclass
class SampleOutput:
  """What `generate` returns (all jax arrays, batch-sharded like the prompt).

  tokens           int32 [B, P+N]  prompt (left padding kept) followed by the completion;
                   with infilling the prompt's mask tokens are filled too
  reveal_step      int32 [B, P+N]  step at which each position was revealed (padding that
                   `early_stop` writes: the step the row finished); -1 for given tokens
  num_steps        int32 []        sampler steps run (one model forward each, two with CFG)
  num_full_forwards int32 []       forwards over the whole canvas (cache refreshes; CFG counts
                   its unconditional pass)
  step_confidence  float32 [T, B, G] or None  (return_history) the confidence of every masked
                   region position at each step (G = N, or P + N with infilling); -inf where
                   already revealed, NaN for steps not run (early exits)
  """

  tokens: jax.Array
  reveal_step: jax.Array
  num_steps: jax.Array
  num_full_forwards: jax.Array
  step_confidence: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Static:
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
  infill: bool = False  # the region is the whole canvas (the prompt holds mask tokens)
  use_cfg: bool = False
  logits_eos_inf: bool = False
  confidence_eos_eot_inf: bool = False
  early_stop: bool = False
  end_ids: tuple[int, ...] = ()
  fill_id: int = 0  # what early_stop writes after a finished row's end token


@functools.lru_cache(maxsize=64)
def compiled(static: Static):
  return jax.jit(functools.partial(_sample, static))


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


_BL = ("activation_batch", "activation_length")


def _sample(st: Static, params, prompt_ids_BxP, prompt_mask_BxP, rng, arrays, scalars):
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    return _Program(st, params, prompt_mask_BxP, rng, arrays, scalars).run(prompt_ids_BxP)


class _Program:
  """The traced sampler: state is a dict carried through the loops."""

  def __init__(self, st: Static, params, prompt_mask_BxP, rng, arrays, scalars):
    self.st, self.c, self.params, self.rng = st, st.config, params, rng
    self.block_of_step, self.reveal_count, self.transfer_prob, self.refresh = arrays
    (self.temperature, self.top_p, self.alg_temp, self.threshold,
     self.cfg_scale) = (scalars[i] for i in range(NUM_SCALARS))
    b, p = prompt_mask_BxP.shape
    n = st.max_new_tokens
    self.b, self.p, self.n, self.l = b, p, n, p + n
    self.r0 = 0 if st.infill else p  # first position of the region
    self.keep_BxL = _constrain(
        jnp.concatenate([prompt_mask_BxP, jnp.ones((b, n), bool)], axis=1), _BL)
    self.positions_BxL = model_lib.keep_positions(self.keep_BxL)

  # -- state
  def init_state(self, prompt_ids_BxP):
    st, b, n, mask = self.st, self.b, self.n, self.c.mask_token_id
    canvas = _constrain(jnp.concatenate([prompt_ids_BxP, jnp.full((b, n), mask, jnp.int32)],
                                        axis=1), _BL)
    self.given_BxL = canvas != mask  # CFG's unconditional pass masks these (LLaDA's prompt_index)
    state = {
        "canvas": canvas,
        "reveal": _constrain(jnp.full((b, self.l), -1, jnp.int32), _BL),
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
      state["history"] = _constrain(jnp.full((st.num_steps, b, self.l - self.r0), jnp.nan,
                                             jnp.float32), (None,) + _BL)
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
    elif static_blocks:
      spb = st.num_steps // st.num_blocks
      for blk in range(st.num_blocks):
        if st.early_stop:
          state = jax.lax.while_loop(
              lambda s, end=(blk + 1) * spb: (s["step"] < end) & self._any_masked(s),
              lambda s, blk=blk: self._fixed_step(blk, s["step"], s), state)
        else:
          state = jax.lax.fori_loop(blk * spb, (blk + 1) * spb,
                                    functools.partial(self._fixed_step, blk), state)
    elif st.early_stop:  # rows that finish stop changing; the loop exits when all have
      state = jax.lax.while_loop(
          lambda s: (s["step"] < st.num_steps) & self._any_masked(s),
          lambda s: self._fixed_step(None, s["step"], s), state)
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

  def _masked_BxL(self, canvas):
    return (canvas == self.c.mask_token_id) & self.keep_BxL

  def _any_masked(self, state):
    return self._masked_BxL(state["canvas"])[:, self.r0:].any()

  def _masked_blocks(self, state):
    gen = self._masked_BxL(state["canvas"])[:, self.r0:]
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
    start = self.r0 + blk * bl
    logits_BxWxV, state = self._block_logits(state, start, refresh)
    if st.logits_eos_inf:  # LLaDA: the end-of-text token is never proposed nor weighed
      logits_BxWxV = logits_BxWxV.at[..., c.eos_token_id].set(-jnp.inf)

    i = state["step"]
    k_tok, k_pos = jax.random.split(jax.random.fold_in(self.rng, i))
    window = lambda x: jax.lax.dynamic_slice_in_dim(x, start, bl, axis=1)
    tokens_BxW = window(state["canvas"])
    masked_BxW = (tokens_BxW == c.mask_token_id) & window(self.keep_BxL)
    proposal, confidence, prob = proposals.propose(
        logits_BxWxV, k_tok if st.sample else None,
        alg="maskgit_plus" if st.alg == "random" else st.alg,
        temperature=self.temperature if st.sample else None,
        top_p=self.top_p if st.use_top_p else None, top_k=st.top_k,
        forbidden_token=c.mask_token_id)
    if st.alg == "random":  # LLaDA's remasking='random'
      confidence = proposals.random_confidence(self.rng, i, masked_BxW.shape)
    tier = None
    ends = jnp.zeros_like(masked_BxW)
    if st.confidence_eos_eot_inf:  # end-token proposals rank after every other masked one
      ends = jnp.isin(proposal, jnp.asarray(st.end_ids, jnp.int32))
      confidence = jnp.where(ends, -jnp.inf, confidence)
      tier = jnp.where(masked_BxW, ends.astype(jnp.int32), 2)
    confidence = jnp.where(masked_BxW, confidence, -jnp.inf)

    if st.alg == "origin":
      u = jax.random.uniform(k_pos, masked_BxW.shape, jnp.float32)
      reveal_BxW = masked_BxW & (u < self.transfer_prob[i])
    else:
      score = proposals.position_scores(confidence, masked_BxW, k_pos if st.use_alg_temp else None,
                                        self.alg_temp if st.use_alg_temp else None)
      rank = proposals.descending_rank(score, tier)
      if st.threshold_mode:
        reveal_BxW = masked_BxW & (((prob >= self.threshold) & ~ends) | (rank == 0))
      else:
        reveal_BxW = masked_BxW & (rank < self.reveal_count[i])

    state = dict(state)
    update = lambda x, new: jax.lax.dynamic_update_slice_in_dim(x, new, start, 1)
    state["canvas"] = update(state["canvas"], jnp.where(reveal_BxW, proposal, tokens_BxW))
    state["reveal"] = update(state["reveal"], jnp.where(reveal_BxW, i, window(state["reveal"])))
    if st.early_stop:
      state = self._finish_rows(state, i)
    if st.return_history:
      row = jnp.full((self.b, self.l - self.r0), -jnp.inf, jnp.float32)
      row = jax.lax.dynamic_update_slice_in_dim(row, confidence, start - self.r0, 1)
      state["history"] = state["history"].at[i].set(row)
    state["step"] = i + 1
    state["prev_block"] = jnp.asarray(blk, jnp.int32)
    state["since_refresh"] = jnp.where(refresh, 1, state["since_refresh"] + 1)
    return state

  def _finish_rows(self, state, i):
    """early_stop: a row whose completion holds an end token with no mask anywhere before it
    is finished: its remaining masks (all after that token) become `fill_id`."""
    canvas = state["canvas"]
    masked = self._masked_BxL(canvas)
    col = jnp.arange(self.l)[None, :]
    is_end = jnp.isin(canvas, jnp.asarray(self.st.end_ids, jnp.int32)) & (col >= self.p)
    first_end = jnp.min(jnp.where(is_end, col, self.l), axis=1, keepdims=True)  # l: none
    done = (first_end < self.l) & ~jnp.any(masked & (col < first_end), axis=1, keepdims=True)
    fill = done & masked
    state["canvas"] = jnp.where(fill, self.st.fill_id, canvas)
    state["reveal"] = jnp.where(fill, i, state["reveal"])
    return state

  def _block_logits(self, state, start, refresh):
    """Logits that predict the block [start, start + bl): the whole canvas on a refresh
    (storing every layer's K/V when caching), else only a window over the cache."""
    st, c, bl = self.st, self.c, self.st.block_length
    state = dict(state)

    def full(cache, canvas=None):
      canvas = state["canvas"] if canvas is None else canvas
      if st.infill:  # the region is the whole canvas: Dream's shift, position 0 reads itself
        _, logits = model_lib.forward(c, self.params, canvas, self.positions_BxL,
                                      model_lib.masks.keep_segments(self.keep_BxL))
        return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1), None
      new_cache, logits = model_lib.forward(
          c, self.params, canvas, self.positions_BxL,
          model_lib.masks.keep_segments(self.keep_BxL), collect_kv=cache is not None,
          logits_start=start - 1, logits_length=bl)
      return logits, new_cache

    if st.cache is None:
      logits, _ = full(None)
      state["full"] = state["full"] + 1
      if st.use_cfg:  # LLaDA: un + (s + 1) (cond - un), the given tokens masked in `un`
        unconditional = jnp.where(self.given_BxL, c.mask_token_id, state["canvas"])
        un = full(None, unconditional)[0].astype(jnp.float32)
        logits = un + (self.cfg_scale + 1) * (logits.astype(jnp.float32) - un)
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
