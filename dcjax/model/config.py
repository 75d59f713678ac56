"""The model's hyperparameters: one frozen, hashable dataclass (a static jit argument)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# remat_policy name -> the `jax.checkpoint_policies` policy applied to each scanned layer.
# How the model runs, not what it computes: a run may set these on top of a checkpoint's
# config.json, and a resumed run may change them.
RUNTIME_FIELDS = ("dtype", "remat_policy", "attention_impl", "logits_chunk", "scan_layers")
REMAT_POLICIES = {"none": None, "full": "nothing_saveable", "dots": "checkpoint_dots",
                  "dots_no_batch": "checkpoint_dots_with_no_batch_dims"}
# docs/attention.md: xla keeps [heads, L, L] scores; blockwise and splash never do.
ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn", "blockwise", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Dream / DiffuCoder (Qwen2 layout) decoder with bidirectional attention.

  Field names follow the Hugging Face `config.json` where one exists, except
  `num_layers` (`num_hidden_layers`) and `num_kv_heads` (`num_key_value_heads`).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`;
  # norms, softmax and log-softmax always run in float32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Memory: rematerialisation policy applied to each scanned layer.
  remat_policy: str = "none"
  attention_impl: str = "xla"
  # True: one nn.scan over the layers (one compiled layer body; the pods' setting). False: a
  # Python loop over the same stacked parameters, faster for small models on CPU.
  scan_layers: bool = True
  # Losses and log-prob passes apply the LM head to this many positions at a time (0: all).
  logits_chunk: int = 1024
  initializer_range: float = 0.02
  # Special token ids carried in config.json (None where the checkpoint has none).
  mask_token_id: int | None = None
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"config.model has unknown fields {unknown}; known fields: {sorted(names)}")
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self, prefix: str = "config.model") -> None:
    """Raises ValueError naming the first bad field."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{prefix}.{name}={value!r} must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{prefix}.num_kv_heads={self.num_kv_heads} must divide "
                       f"{prefix}.num_heads={self.num_heads} (grouped-query attention)")
    if self.head_dim % 2:
      raise ValueError(f"{prefix}.head_dim={self.head_dim} must be even (rotary embedding)")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"{prefix}.remat_policy={self.remat_policy!r} is not one of "
                       f"{tuple(REMAT_POLICIES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"{prefix}.attention_impl={self.attention_impl!r} is not one of "
                       f"{ATTENTION_IMPLS}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"{prefix}.scan_layers={self.scan_layers!r} must be True or False")
    if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
      raise ValueError(f"{prefix}.logits_chunk={self.logits_chunk!r} must be an integer >= 0 "
                       "(0: the whole sequence at once)")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{prefix}.{name}={value!r} must be float32, bfloat16 or float16")
    if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
      raise ValueError(f"{prefix}.rope_theta and {prefix}.rms_norm_eps must be positive")
    if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
      raise ValueError(f"{prefix}.mask_token_id={self.mask_token_id} is outside the vocabulary "
                       f"[0, {self.vocab_size})")

  def check_positions(self, length: int, what: str, where: str = "") -> None:
    """Raises ValueError when `what` needs more than max_position_embeddings positions.

    `where` names the model config the limit comes from (e.g. "config.model").
    """
    if length > self.max_position_embeddings:
      source = f" ({where})" if where else ""
      raise ValueError(f"{what} = {length} positions, more than the model's "
                       f"max_position_embeddings={self.max_position_embeddings}{source}")

  def num_params(self) -> int:
    """Exact parameter count of the architecture (agrees with jax.eval_shape)."""
    d, f, h, kv, dh = (self.hidden_size, self.intermediate_size, self.num_heads,
                       self.num_kv_heads, self.head_dim)
    attn = d * h * dh + h * dh + 2 * (d * kv * dh + kv * dh) + h * dh * d
    layer = attn + 3 * d * f + 2 * d
    return 2 * self.vocab_size * d + self.num_layers * layer + d
