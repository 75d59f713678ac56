"""A plain torch port of LLaDA's released `generate` (ML-GSAI/LLaDA generate.py), for the tests.

Written from the published algorithm (docs/sampler.md): the canvas is the prompt plus
`gen_length` mask tokens, split into blocks of `block_length` refined one after the other
with `steps / num_blocks` steps each; per block and row the count of masked positions m is
spread as `m // steps` per step, the first `m % steps` steps one more. At each step:

* logits from the mask predictor; with `cfg_scale` > 0 also on the canvas whose initially
  given tokens (LLaDA's `prompt_index`) are masked, combined as un + (cfg_scale + 1)(cond - un);
* `logits_eos_inf`: the EOS logit is -inf;
* proposal = argmax of the logits with Gumbel noise (float64, `exp(logits) / (-log u)^T`;
  temperature 0 is the plain argmax);
* confidence = softmax probability of the proposal (`low_confidence`) or a uniform draw
  (`random`); -inf after the current block and at unmasked positions;
* `confidence_eos_eot_inf`: positions proposing an end token (EOS / EOT) get -inf;
* the top `count` confidences of each row are revealed.

The port departs from LLaDA only where dcjax documents a choice: the proposal is never the
mask token, exact ties go to the lower position (torch.topk leaves their order open), and
end-token proposals under `confidence_eos_eot_inf` rank after the other masked positions
(LLaDA's top-k among -inf entries may pick unmasked positions and reveal fewer).

The mask predictor is `model(tokens [B, L] numpy, keep [B, L] bool, positions [B, L])` ->
logits [B, L, V] where logits[:, j] predicts token j (LLaDA's convention; a Dream-style model
is passed in shifted).
"""

import numpy as np
import torch


def add_gumbel_noise(logits, temperature, generator=None):
  """LLaDA's float64 Gumbel-max perturbation (identity at temperature 0)."""
  if temperature == 0:
    return logits
  logits = logits.to(torch.float64)
  noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
  return logits.exp() / (-torch.log(noise)) ** temperature


def num_transfer_tokens(block_masked, steps):
  """[B, steps]: `m // steps` per step, the first `m % steps` steps one more (m per row)."""
  m = block_masked.sum(dim=1, keepdim=True)
  counts = torch.zeros(m.shape[0], steps, dtype=torch.long) + m // steps
  for row in range(m.shape[0]):
    counts[row, :int(m[row] % steps)] += 1
  return counts


def llada_generate(model, ids, keep, *, mask_id, gen_length, steps, block_length, temperature=0.,
                   cfg_scale=0., remasking="low_confidence", logits_eos_inf=False,
                   confidence_eos_eot_inf=False, eos_id=None, end_ids=(), uniforms=None,
                   seed=0):
  """LLaDA's loop. `uniforms(step) -> [B, L]` supplies the random confidences of
  remasking='random' (default: torch.rand). Returns (canvas [B, P + N] numpy, reveal step per
  position (-1: never revealed), the smallest non-zero gap between a row's last revealed and
  first kept-back confidence over the low-confidence steps: below float noise, a near-tie)."""
  generator = torch.Generator().manual_seed(seed)
  b, p = ids.shape
  x = torch.cat([torch.as_tensor(ids, dtype=torch.long),
                 torch.full((b, gen_length), mask_id, dtype=torch.long)], dim=1)
  keep = np.concatenate([np.asarray(keep, bool), np.ones((b, gen_length), bool)], axis=1)
  positions = np.where(keep, np.cumsum(keep, axis=1) - 1, 1)
  prompt_index = x != mask_id
  reveal = torch.full(x.shape, -1, dtype=torch.long)
  assert gen_length % block_length == 0
  num_blocks = gen_length // block_length
  assert steps % num_blocks == 0
  steps_per_block = steps // num_blocks
  logits_of = lambda tokens: torch.from_numpy(
      np.array(model(tokens.numpy(), keep, positions), np.float32))
  min_gap, step = np.inf, 0
  for blk in range(num_blocks):
    lo, hi = p + blk * block_length, p + (blk + 1) * block_length
    counts = num_transfer_tokens(x[:, lo:hi] == mask_id, steps_per_block)
    for i in range(steps_per_block):
      mask_index = x == mask_id
      logits = logits_of(x)
      if cfg_scale > 0:
        un_x = x.clone()
        un_x[prompt_index] = mask_id
        un_logits = logits_of(un_x)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
      if logits_eos_inf:
        logits[:, :, eos_id] = -torch.inf
      noisy = add_gumbel_noise(logits, temperature, generator)
      noisy = noisy.clone()
      noisy[:, :, mask_id] = -torch.inf  # dcjax: the mask token is never proposed
      x0 = torch.argmax(noisy, dim=-1)
      if remasking == "low_confidence":
        probs = torch.softmax(logits, dim=-1)
        x0_p = torch.gather(probs, -1, x0[..., None])[..., 0]
      elif remasking == "random":
        x0_p = (torch.as_tensor(np.asarray(uniforms(step)), dtype=torch.float32)
                if uniforms is not None else torch.rand(x0.shape, generator=generator))
      else:
        raise NotImplementedError(remasking)
      ends = torch.isin(x0, torch.as_tensor(list(end_ids), dtype=torch.long))
      if confidence_eos_eot_inf:
        x0_p = torch.where(ends, -torch.inf, x0_p)
      x0_p[:, hi:] = -torch.inf
      x0 = torch.where(mask_index, x0, x)
      confidence = torch.where(mask_index, x0_p, -torch.inf)
      for row in range(b):
        k = int(counts[row, i])
        # Order: masked non-end proposals by confidence, then masked end proposals (dcjax),
        # then the rest; exact ties to the lower position.
        open_ = mask_index[row] & (torch.arange(x.shape[1]) < hi)
        demoted = ends[row] if confidence_eos_eot_inf else torch.zeros_like(open_)
        tier = torch.where(open_, demoted.long(), 2)
        order = sorted(range(x.shape[1]),
                       key=lambda j: (int(tier[j]), -float(confidence[row, j]), j))
        chosen = [j for j in order[:k] if mask_index[row, j] and j < hi]
        if remasking == "low_confidence" and 0 < k < len(order):
          gap = float(confidence[row, order[k - 1]] - confidence[row, order[k]])
          if np.isfinite(gap) and gap > 0:
            min_gap = min(min_gap, gap)
        x[row, chosen] = x0[row, chosen]
        reveal[row, chosen] = step
      step += 1
  return x.numpy(), reveal.numpy(), min_gap
