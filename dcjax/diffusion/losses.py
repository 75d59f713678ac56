"""The masked-diffusion ELBO of docs/losses.md, with the logit shift, for pretraining and SFT.

A training batch is a dict of [B, L] arrays:
  tokens       int32  the clean sequence x0
  segment_ids  int32  packed-document ids (0 = padding); all ones for SFT rows
  positions    int32  position inside each document (used with `document_mask`)
  prompt_mask  bool   SFT prompt tokens, never masked and never targets

`prepare` draws the forward process for the whole global batch; `loss_sums` turns the
model's unshifted logits into sums (weighted CE, CE, correct, count) so that micro-batches
add up exactly to the big batch; `normaliser` gives the divisor the config asks for.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from dcjax.diffusion import cart as cart_lib
from dcjax.diffusion import forward_process as fp
from dcjax.model import head, masks

NORMALISERS = ("token", "llada")
WEIGHTINGS = ("inverse_t", "cart")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss options (see configs/*.py `train.loss`)."""

  noise: fp.NoiseConfig = fp.NoiseConfig()
  # "token": divide by the number of masked targets (DiffuLLaMA / DiffuCoder);
  # "llada": divide by the number of maskable tokens (batch * length when nothing is padded).
  normaliser: str = "token"
  weighting: str = "inverse_t"   # 1/t, or Dream's CART weights
  cart_p: float = 0.3
  document_mask: bool = False    # attention and targets stay inside packed documents

  def validate(self, prefix: str = "config.train.loss") -> None:
    if self.normaliser not in NORMALISERS:
      raise ValueError(f"{prefix}.normaliser={self.normaliser!r} is not one of {NORMALISERS}")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"{prefix}.weighting={self.weighting!r} is not one of {WEIGHTINGS}")
    if not 0 < self.noise.eps < 1:
      raise ValueError(f"{prefix}.eps={self.noise.eps} must lie in (0, 1)")
    if not 0 <= self.noise.truncate_prob <= 1:
      raise ValueError(f"{prefix}.truncate_prob={self.noise.truncate_prob} must lie in [0, 1]")
    if self.noise.anneal_steps < 0:
      raise ValueError(f"{prefix}.anneal_steps={self.noise.anneal_steps} must be >= 0")
    if not 0 < self.cart_p < 1:
      raise ValueError(f"{prefix}.cart_p={self.cart_p} must lie in (0, 1)")

  @property
  def needs_attention_mask(self) -> bool:
    return (self.document_mask or self.noise.anneal_steps > 0
            or self.noise.truncate_prob > 0)


def prepare(batch, noise: fp.Noise, mask_id: int, cfg: LossConfig) -> dict:
  """Noised inputs, targets and weights for a global batch ([B, L] arrays)."""
  tokens_BxL = batch["tokens"]
  length = tokens_BxL.shape[1]
  keep_BxL = (batch["segment_ids"] > 0) & fp.truncation_keep(noise.length_B, length)
  maskable_BxL = keep_BxL & ~batch["prompt_mask"].astype(bool)
  noisy_BxL, masked_BxL = fp.mask_tokens(tokens_BxL, maskable_BxL, noise.t_B, noise.u_BxL,
                                         mask_id)
  # Shift: the output at i-1 predicts token i, so position 0 is never a target; with
  # document masking neither is a document's first token (its predictor sees another doc).
  target_BxL = masked_BxL.at[:, 0].set(False)
  if cfg.document_mask:
    target_BxL = target_BxL & ~fp.document_starts(batch["segment_ids"])
  if cfg.weighting == "cart":
    weight_BxL = cart_lib.cart_weights(masked_BxL, keep_BxL, cfg.cart_p)
  else:
    weight_BxL = jnp.broadcast_to((1.0 / noise.t_B)[:, None], tokens_BxL.shape)
  return dict(tokens=tokens_BxL, noisy=noisy_BxL, target=target_BxL, weight=weight_BxL,
              keep=keep_BxL, maskable=maskable_BxL, segment_ids=batch["segment_ids"],
              positions=batch["positions"])


def normaliser(prepared: dict, cfg: LossConfig):
  """The loss divisor for the whole global batch (at least 1)."""
  if cfg.normaliser == "token":
    count = jnp.sum(prepared["target"])
  else:
    count = jnp.sum(prepared["maskable"])
  return jnp.maximum(count, 1).astype(jnp.float32)


def model_inputs(prepared: dict, anneal_LxL, cfg: LossConfig):
  """(attention_mask or None, positions or None) for `dcjax.model.apply`."""
  if not cfg.needs_attention_mask:
    return None, None
  # Real tokens see the real tokens of their own document (segments, which every attention
  # kernel takes); the annealed mask is a dense pattern on top (docs/attention.md).
  segments = masks.keep_segments(prepared["keep"],
                                 prepared["segment_ids"] if cfg.document_mask else None)
  mask = segments if anneal_LxL is None else masks.dense(segments) & anneal_LxL[None]
  positions_BxL = prepared["positions"] if cfg.document_mask else None
  return mask, positions_BxL


def loss_sums(logits_BxLxV, prepared: dict) -> dict:
  """Sums over the batch's targets: weighted CE, plain CE, correct argmaxes, target count."""
  logits_BxMxV = logits_BxLxV[:, :-1].astype(jnp.float32)   # M = L - 1
  labels_BxM = prepared["tokens"][:, 1:]
  ce_BxM = optax.softmax_cross_entropy_with_integer_labels(logits_BxMxV, labels_BxM)
  return _sums(ce_BxM, jnp.argmax(logits_BxMxV, axis=-1) == labels_BxM, prepared)


def scored_positions(prepared: dict):
  """[B, L] bool: the positions the loss reads, position i where token i + 1 is a target
  (the logit shift); the last position never. Pass it to `model.hidden(..., wanted=)`."""
  return jnp.pad(prepared["target"][:, 1:], ((0, 0), (0, 1)))


def hidden_loss_sums(model_config, params, hidden_BxLxD, prepared: dict) -> dict:
  """`loss_sums` from the final-norm hidden states, the LM head applied in chunks of
  `model_config.logits_chunk` positions (`dcjax.model.head`): the same sums without
  [B, L, V] fp32 logits. Position i is scored with label token i + 1, and only where that
  token is a target (the head skips the rest: docs/attention.md, "Scoring only the
  targets"); the last position is never scored."""
  labels_BxL = jnp.roll(prepared["tokens"], -1, axis=1)
  scored_BxL = scored_positions(prepared)
  stats = head.token_logps(model_config, params, hidden_BxLxD, labels_BxL, where=scored_BxL)
  return _sums(-stats["logp"][:, :-1], stats["hit"][:, :-1], prepared)


def _sums(ce_BxM, hit_BxM, prepared: dict) -> dict:
  target_BxM = prepared["target"][:, 1:]
  ce_BxM = jnp.where(target_BxM, ce_BxM, 0.0)
  correct_BxM = target_BxM & hit_BxM
  return dict(
      loss_sum=jnp.sum(ce_BxM * prepared["weight"][:, 1:]),
      ce_sum=jnp.sum(ce_BxM),
      correct=jnp.sum(correct_BxM).astype(jnp.float32),
      targets=jnp.sum(target_BxM).astype(jnp.float32),
      maskable=jnp.sum(prepared["maskable"]).astype(jnp.float32),
  )


SUM_KEYS = ("loss_sum", "ce_sum", "correct", "targets", "maskable")


def zero_sums() -> dict:
  return {key: jnp.zeros((), jnp.float32) for key in SUM_KEYS}


def summarise(sums: dict, denominator) -> dict:
  """Scalar metrics from (summed) loss sums: the loss and its token-mean report."""
  targets = jnp.maximum(sums["targets"], 1.0)
  return dict(
      loss=sums["loss_sum"] / denominator,
      loss_token_mean=sums["loss_sum"] / targets,          # docs/losses.md: always reported
      elbo_per_token=sums["loss_sum"] / jnp.maximum(sums["maskable"], 1.0),
      ce_masked=sums["ce_sum"] / targets,
      accuracy=sums["correct"] / targets,
      masked_fraction=sums["targets"] / jnp.maximum(sums["maskable"], 1.0),
  )


def diffusion_loss(apply_fn, params, batch, key, mask_id: int, cfg: LossConfig, step=0):
  """One-call loss for a batch: (scalar loss, metrics). `apply_fn(params, tokens, mask,
  positions)` returns unshifted logits. Used by tests and evaluation."""
  length = batch["tokens"].shape[1]
  noise = fp.draw_noise(key, batch["tokens"].shape[0], length, cfg.noise)
  prepared = prepare(batch, noise, mask_id, cfg)
  anneal = None
  if noise.anneal_u_LxL is not None:
    anneal = fp.annealed_attention_mask(noise.anneal_u_LxL,
                                        fp.anneal_ratio(step, cfg.noise.anneal_steps))
  mask, positions = model_inputs(prepared, anneal, cfg)
  logits = apply_fn(params, prepared["noisy"], mask, positions)
  sums = loss_sums(logits, prepared)
  metrics = summarise(sums, normaliser(prepared, cfg))
  return metrics["loss"], metrics


def as_batch(tokens_BxL, prompt_mask_BxL=None):
  """A batch dict for unpacked rows (every token real, positions 0..L-1)."""
  tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
  b, l = tokens_BxL.shape
  prompt = (jnp.zeros((b, l), bool) if prompt_mask_BxL is None
            else jnp.asarray(prompt_mask_BxL, bool))
  return dict(tokens=tokens_BxL, segment_ids=jnp.ones((b, l), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
              prompt_mask=prompt)

