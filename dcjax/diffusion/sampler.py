"""The jitted parallel-unmasking sampler: Dream's `diffusion_generate` (docs/sampler.md) and beyond.

`generate` runs one compiled program (`sampler_program.py`): a `lax.fori_loop` over the
steps (a `while_loop` for confidence-threshold decoding and `early_stop`, which exit early)
whose per-step reveal counts and probabilities are host-computed arrays (`schedule.py`,
prepared by `sampler_inputs.program_inputs`), so a new prompt of the same padded shape
reuses the compiled program. The jitted function is cached on the static settings.

Per step (t = timesteps[i], s = timesteps[i + 1]):
  1. logits of the active block from the model on the whole canvas (or from a block KV
     cache), shifted (position j reads the output at j - 1); with `cfg_scale` also on the
     canvas with the given tokens masked, combined as LLaDA's `un + (s + 1)(cond - un)`;
  2. confidences on Dream's distribution (tempered, top-p/top-k-filtered, the mask token
     included), or uniform draws (`alg='random'`, LLaDA's random remasking); the proposed
     token is the best / a sampled one other than the mask token;
  3. reveal: `origin` each masked position with probability 1 - s/t; confidence algorithms
     the k most confident masked positions (k from the schedule; Gumbel top-k with
     `alg_temp`); threshold decoding every masked position whose proposal probability is
     >= threshold plus the single most confident one. Revealed tokens are never re-masked.

Infilling: mask tokens inside the prompt are filled too. The region the sampler writes is
then the whole canvas (one block) and the schedule counts every mask of each row, as
Dream's loop does on any canvas.

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
* a row reveals at most its own masked count (Dream's top-k with the batch-average k could
  pick already-revealed positions and re-mask them when rows differ);
* proposals and confidences in float32; ties rank the lower position first; a top-p
  cutoff keeps every token tied with the last kept one;
* threshold decoding ranks by the alg's confidence for the "at least one" token and runs
  at most N steps; the block's first step is an ordinary step on whole-canvas logits
  (Fast-dLLM's Dream code force-reveals the block's first position there);
* `confidence_eos_eot_inf` ranks end-token proposals after every other masked position
  (LLaDA's top-k among -inf confidences picks arbitrary positions).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcjax.diffusion.sampler_inputs import check_prompts, program_inputs, prompt_mask_counts
from dcjax.diffusion.sampler_program import BATCH_AXES, SampleOutput, compiled
from dcjax.model import as_model_config

__all__ = ["BATCH_AXES", "SampleOutput", "generate", "lower"]


def generate(config: Any, params, prompt_ids_BxP, prompt_mask_BxP=None, *, max_new_tokens: int,
             steps: int, alg: str, temperature: float = 0.0, top_p: float | None = None,
             top_k: int | None = None, alg_temp: float | None = None, eps: float = 1e-3,
             block_length: int | None = None, threshold: float | None = None,
             cache: str | None = None, cache_refresh_every: int = 0, cfg_scale: float = 0.0,
             logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
             early_stop: bool = False, end_token_ids: Sequence[int] | None = None,
             rng: jax.Array | None = None, return_history: bool = False,
             mesh: Mesh | None = None) -> SampleOutput:
  """Fills `max_new_tokens` mask tokens after each left-padded prompt, and every mask token
  inside the prompts (docs/sampler.md).

  Args:
    config: a ModelConfig (or anything `dcjax.model.as_model_config` takes); its
      `mask_token_id` is the mask.
    params: the model's parameter pytree, used as given (sharded or not; never copied).
    prompt_ids_BxP: int [B, P] left-padded prompts (P >= 1); mask tokens among the real
      tokens are filled (infilling: no blocks or cache then).
    prompt_mask_BxP: [B, P] 1 for real prompt tokens, 0 for left padding (None: all real).
    max_new_tokens: N, the completion length (0 is allowed when the prompts hold masks).
    steps: sampler steps (a multiple of the number of blocks); unused with `threshold`.
    alg: 'origin', 'maskgit_plus', 'topk_margin', 'entropy' or 'random' (LLaDA's
      remasking='random': uniform confidences; LLaDA's 'low_confidence' is 'maskgit_plus').
    temperature: 0 = greedy proposals; > 0 samples the tempered distribution.
    top_p, top_k: proposal filters (Dream's order: top-p, then top-k).
    alg_temp: > 0 samples the revealed positions from softmax(confidence / alg_temp).
    eps: final time of Dream's linspace(1, eps, steps + 1).
    block_length: LLaDA-style semi-autoregressive blocks (divides max_new_tokens).
    threshold: Fast-dLLM decoding: reveal every masked position of the active block whose
      proposal probability is >= threshold, and at least the most confident one; runs until
      the canvas is full (at most one step per region position).
    cache: None, 'prefix' or 'dual' block KV cache (Fast-dLLM).
    cache_refresh_every: with a cache, also recompute the whole canvas every this many steps
      within a block (0 = only at each block's first step; 1 = every step, cache-free).
    cfg_scale: > 0: LLaDA's classifier-free guidance, logits = un + (cfg_scale + 1)(cond - un)
      where `un` is the model on the canvas with every given (initially unmasked) token masked.
    logits_eos_inf: the logit of `config.eos_token_id` is -inf (never proposed).
    confidence_eos_eot_inf: positions whose proposal is an end token get confidence -inf
      (revealed only when nothing else is left; never by the threshold rule).
    early_stop: a row whose completion holds an end token with no mask before it is done:
      its remaining masks become `config.pad_token_id` and it stops changing; the loop
      exits when every row is done.
    end_token_ids: the end tokens (EOS, EOT / `<|im_end|>`, pad) of the two options above;
      default (config.eos_token_id,).
    rng: PRNG key, needed when temperature > 0, alg_temp > 0 or alg is 'origin' / 'random'.
    return_history: also return the per-step confidences.
    mesh: shard the batch over the mesh's ('data', 'fsdp') axes and apply the model's
      logical sharding rules inside (B must divide evenly).
  """
  c = as_model_config(config)
  prompt_ids_BxP, prompt_mask_BxP = check_prompts(prompt_ids_BxP, prompt_mask_BxP)
  masks = (prompt_mask_counts(prompt_ids_BxP, prompt_mask_BxP, c.mask_token_id)
           if c.mask_token_id is not None else None)
  static, arrays, scalars, rng = program_inputs(
      c, prompt_ids_BxP.shape, max_new_tokens=max_new_tokens, steps=steps, alg=alg,
      temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp, eps=eps,
      block_length=block_length, threshold=threshold, cache=cache,
      cache_refresh_every=cache_refresh_every, cfg_scale=cfg_scale,
      logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
      early_stop=early_stop, end_token_ids=end_token_ids, rng=rng,
      return_history=return_history, mesh=mesh, prompt_masks=masks)
  if mesh is not None:
    batch = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
    prompt_ids_BxP = jax.device_put(prompt_ids_BxP, batch)
    prompt_mask_BxP = jax.device_put(prompt_mask_BxP, batch)
    with jax.set_mesh(mesh):
      return compiled(static)(params, prompt_ids_BxP, prompt_mask_BxP, rng, arrays, scalars)
  return compiled(static)(params, prompt_ids_BxP, prompt_mask_BxP, rng, arrays, scalars)


def lower(config: Any, abstract_params, batch: int, prompt_len: int, *, mesh: Mesh, **options):
  """The compiled-to-be program `generate` runs for [batch, prompt_len] prompts (without
  mask tokens) on `mesh`, lowered from abstract parameters (ShapeDtypeStructs with
  shardings): the compile mode's view of the sampler (docs/compile.md). `options` are
  `generate`'s keyword arguments."""
  c = as_model_config(config)
  options.setdefault("rng", jax.random.key(0))
  static, arrays, scalars, rng = program_inputs(c, (batch, prompt_len), mesh=mesh, **options)
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
  ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=sharding)
  keep = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=sharding)
  with jax.set_mesh(mesh):
    return compiled(static).lower(abstract_params, ids, keep, rng, arrays, scalars)
