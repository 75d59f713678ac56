"""A plain torch port of Dream's `diffusion_generate` loop (`_sample`), for the sampler tests.

Written from the published algorithm (docs/sampler.md): the canvas is the left-padded prompt
plus mask tokens, positions `cumsum(keep) - 1` with pads at 1, an outer-product attention
mask, `linspace(1, eps, steps + 1)` time steps, shifted logits, Dream's `sample_tokens`
(temperature, top-p, top-k, softmax with the mask token included) and its four reveal rules.
The canvas may hold mask tokens anywhere (infilling): `ids` is any left-padded canvas whose
mask tokens, with `max_new_tokens` more appended, are all filled; like Dream's loop, every
step counts `mask_index` over the whole canvas and ranks every masked position.

It differs from Dream in dcjax's documented choices only: the proposed token is never the
mask token (argmax / sample over the other tokens Dream's filters kept), a position that is
not masked is never written (Dream's batch-average count can pick one in a row with fewer
masks and would write the mask token there), at the last step every row reveals all its
remaining masks (Dream's int(average) leaves some in rows with more masks than the average,
which only infilling canvases have), and exact ties in confidence go to the lower position
(torch.topk leaves their order unspecified).
"""

import numpy as np
import torch


def filtered(logits, temperature, top_p, top_k):
  """Dream's filters: logits / temperature (> 0), then top-p (the crossing token kept), then
  top-k; removed entries get the float minimum."""
  if temperature > 0:
    logits = logits / temperature
  if top_p is not None and top_p < 1:
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    logits = logits.masked_fill(
        torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, remove),
        torch.finfo(logits.dtype).min)
  if top_k is not None:
    kth = torch.topk(logits, top_k)[0][..., -1:]
    logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
  return logits


def sample_tokens(logits, mask_id, temperature=0.0, top_p=None, top_k=None, alg="maskgit_plus",
                  generator=None):
  """Dream's `sample_tokens` -> (confidence, token); the token is never `mask_id`."""
  tempered = logits / temperature if temperature > 0 else logits
  logits = filtered(logits, temperature, top_p, top_k)
  probs = torch.softmax(logits, dim=-1)
  kept = probs > 0
  kept[..., mask_id] = False
  choice = torch.where(kept, probs, torch.zeros_like(probs))
  fallback = ~kept.any(dim=-1)
  if fallback.any():  # the filters kept the mask token alone: best other token
    other = tempered.clone()
    other[..., mask_id] = -torch.inf
    choice[fallback] = torch.softmax(other[fallback], dim=-1)
  if temperature > 0:
    token = torch.multinomial(choice, 1, generator=generator)[:, 0]
  else:
    token = choice.argmax(dim=-1)
  confidence = torch.gather(probs, -1, token[:, None])[:, 0]
  if alg == "topk_margin":
    top2 = torch.sort(probs, dim=-1, descending=True)[0]
    confidence = top2[:, 0] - top2[:, 1]
  elif alg == "entropy":
    confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
  return confidence, token


def canvas(ids, keep, mask_id, max_new_tokens):
  """Dream's initial canvas (`ids`, which may hold masks, then `max_new_tokens` masks),
  positions (pads at 1) and outer-product pair mask."""
  b = ids.shape[0]
  x = torch.cat([torch.as_tensor(ids, dtype=torch.long),
                 torch.full((b, max_new_tokens), mask_id, dtype=torch.long)], dim=1)
  keep = torch.cat([torch.as_tensor(keep, dtype=torch.bool),
                    torch.ones(b, max_new_tokens, dtype=torch.bool)], dim=1)
  positions = keep.long().cumsum(-1) - 1
  positions.masked_fill_(~keep, 1)
  pair = (keep[:, :, None] & keep[:, None, :]).numpy()
  return x, pair, positions.numpy()


def step_proposals(model, x, pair, positions, *, mask_id, i, steps, alg, temperature=0.0,
                   top_p=None, top_k=None, eps=1e-3, generator=None):
  """One step of Dream's confidence rules on canvas `x`.

  Returns (confidence [B, L] with -inf off the masked positions, proposal [B, L] (the mask
  token off them), k = the number of positions each row reveals).
  """
  mask_index = x == mask_id
  logits = torch.from_numpy(np.array(model(x.numpy(), pair, positions), np.float32))
  logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
  confidence, x0 = sample_tokens(logits[mask_index], mask_id, temperature, top_p, top_k, alg,
                                 generator=generator)
  timesteps = torch.linspace(1, eps, steps + 1)
  t, s = timesteps[i], timesteps[i + 1]
  num_mask_token = mask_index.sum() / mask_index.shape[0]
  if i < steps - 1:
    k = int(num_mask_token * (1 - s / t))
  else:  # dcjax: every row's remaining masks (Dream: int(num_mask_token))
    k = max(int(num_mask_token), int(mask_index.sum(dim=1).max()))
  full_confidence = torch.full(x.shape, -torch.inf)
  full_confidence[mask_index] = confidence
  proposal = torch.full_like(x, mask_id)
  proposal[mask_index] = x0
  return full_confidence, proposal, k


def dream_generate(model, ids, keep, *, mask_id, max_new_tokens, steps, alg, temperature=0.0,
                   top_p=None, top_k=None, alg_temp=None, eps=1e-3, seed=0):
  """Dream's loop; `model(tokens, pair_mask [B, L, L] bool, positions)` -> [B, L, V] logits.

  Returns (canvas [B, P + N] numpy, reveal step per position (-1: never revealed), the
  smallest non-zero gap between the k-th and (k+1)-th confidence of a row over the greedy
  top-k steps, in float32 spacings (ulps) at the k-th confidence: within a few, the choice
  is a near-tie that rounding may decide either way (an entropy confidence near -ln V = -6.2
  has a spacing of 4.8e-7, a probability below 1 one of at most 6e-8); exact ties go to the
  lower position, as in dcjax).
  """
  generator = torch.Generator().manual_seed(seed)
  x, pair, positions = canvas(ids, keep, mask_id, max_new_tokens)
  b = x.shape[0]
  reveal = torch.full(x.shape, -1, dtype=torch.long)
  timesteps = torch.linspace(1, eps, steps + 1)
  min_gap = np.inf
  for i in range(steps):
    mask_index = x == mask_id
    if alg == "origin":
      logits = torch.from_numpy(np.array(model(x.numpy(), pair, positions), np.float32))
      logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
      t, s = timesteps[i], timesteps[i + 1]
      p_transfer = 1 - s / t if i < steps - 1 else 1
      x0 = torch.full_like(x[mask_index], mask_id)
      transfer = torch.rand(x0.shape, generator=generator) < p_transfer
      if transfer.any():
        _, x0[transfer] = sample_tokens(logits[mask_index][transfer], mask_id, temperature,
                                        top_p, top_k, generator=generator)
      newly = mask_index.clone()
      newly[mask_index] = transfer
      x[mask_index] = x0
      reveal[newly] = i
      continue
    confidence, proposal, k = step_proposals(
        model, x, pair, positions, mask_id=mask_id, i=i, steps=steps, alg=alg,
        temperature=temperature, top_p=top_p, top_k=top_k, eps=eps, generator=generator)
    if k <= 0:
      continue
    if alg_temp is None or alg_temp == 0:
      # Exact ties go to the lower position (dcjax's rule; torch.topk leaves it open).
      top, order = torch.sort(confidence, dim=-1, descending=True, stable=True)
      if k < x.shape[1]:
        finite = torch.isfinite(top[:, k])
        gaps = (top[:, k - 1] - top[:, k])[finite].numpy().astype(np.float64)
        ulps = gaps / np.spacing(np.abs(top[:, k - 1][finite].numpy())).astype(np.float64)
        min_gap = min([min_gap] + [float(g) for g in ulps if g > 0])
      transfer_index = order[:, :k]
    else:
      weights = torch.softmax(confidence / alg_temp, dim=-1)
      transfer_index = torch.multinomial(weights, k, generator=generator)
    rows = torch.arange(b)[:, None].expand_as(transfer_index)
    writable = mask_index[rows, transfer_index]
    rows, cols = rows[writable], transfer_index[writable]
    x[rows, cols] = proposal[rows, cols]
    reveal[rows, cols] = i
  return x.numpy(), reveal.numpy(), min_gap


def reveal_counts(reveal_step: np.ndarray, steps: int) -> np.ndarray:
  """[steps] number of positions revealed at each step, over the whole batch."""
  revealed = reveal_step[reveal_step >= 0]
  return np.bincount(revealed, minlength=steps)
