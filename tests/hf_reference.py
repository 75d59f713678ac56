"""A tiny random Qwen2 model from `transformers`: the numerical reference for the architecture."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256)


def random_qwen2(seed: int = 0, scale: float = 0.1, **overrides) -> Qwen2ForCausalLM:
  """A Qwen2 model with every weight random (biases and norm weights included); a larger
  `scale` makes its distributions more peaked."""
  config = Qwen2Config(**{**TINY, **overrides})
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(scale * torch.randn_like(p))
  return model


def bidirectional_logits(model, tokens, keep=None, positions=None):
  """Logits with a full non-causal 4-D additive mask (outer product of `keep` if given)."""
  tokens = torch.as_tensor(tokens, dtype=torch.long)
  b, l = tokens.shape
  if keep is None:
    mask = torch.zeros(b, 1, l, l)
  else:
    keep = torch.as_tensor(keep, dtype=torch.bool)
    pair = keep[:, None, :, None] & keep[:, None, None, :]
    mask = torch.where(pair, 0.0, torch.finfo(torch.float32).min)
  kwargs = {}
  if positions is not None:
    kwargs["position_ids"] = torch.as_tensor(positions, dtype=torch.long)
  with torch.no_grad():
    return model(tokens, attention_mask=mask, **kwargs).logits.float().numpy()
