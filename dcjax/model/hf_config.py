"""Hugging Face `config.json` <-> ModelConfig, for the Qwen2 and Dream layouts.

Reading follows transformers' own rules (docs/checkpoints.md):
- a field that is absent takes the default that transformers' `Qwen2Config` (model_type
  "qwen2") or Dream's `DreamConfig` (model_type "Dream") documents for it (`DEFAULTS`);
- RoPE theta comes from `rope_parameters` (transformers >= 5), the legacy `rope_scaling`
  dict, or the top-level `rope_theta` (the released Dream / DiffuCoder configs), in
  transformers' order of priority; only `rope_type` "default" is supported;
- anything that would change the numerics and that dcjax does not implement (another RoPE
  type, a sliding window in use, a non-full `layer_types` entry, an activation other than
  SiLU, an unknown field) is a `CheckpointError` naming the field and the file.

Writing emits both RoPE layouts (`rope_theta` and `rope_parameters`) so that transformers 5
and a legacy top-level reader (Dream's remote code) agree on theta, the tie setting and
`head_dim`.
"""

from __future__ import annotations

import json
import os

from dcjax.model.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("Dream", "qwen2")
CONFIG_FILE = "config.json"

# transformers' Qwen2Config defaults; Dream's DreamConfig has the same ones plus its mask and
# pad ids. Dream's attention always uses head_dim = hidden_size // num_attention_heads.
_QWEN2_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
    max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False,
    sliding_window=4096, max_window_layers=28, pad_token_id=None, bos_token_id=None,
    eos_token_id=None, mask_token_id=None)
DEFAULTS = {
    "qwen2": _QWEN2_DEFAULTS,
    "Dream": {**_QWEN2_DEFAULTS, "mask_token_id": 151666, "pad_token_id": 151643},
}
# Read above or checked below; everything else in config.json must be one of these.
_NUMERIC_FIELDS = set(_QWEN2_DEFAULTS) | {
    "model_type", "head_dim", "rope_parameters", "rope_scaling", "layer_types", "mlp_bias",
    "attention_bias", "attention_dropout"}
# Fields with no effect on the forward pass: PretrainedConfig's bookkeeping and generation
# settings (transformers 4 wrote many of them), remote-code pointers, dtype labels.
_INERT_FIELDS = {
    "_name_or_path", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "problem_type", "is_encoder_decoder", "chunk_size_feed_forward",
    "tokenizer_class", "prefix", "task_specific_params", "torchscript", "use_bfloat16",
    "pruned_heads", "tf_legacy_loss", "finetuning_task", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "decoder_start_token_id",
    "sep_token_id", "bad_words_ids", "begin_suppress_tokens", "suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values",
    "repetition_penalty", "return_dict_in_generate", "temperature", "top_k", "top_p",
    "typical_p", "generation_config", "quantization_config_applied"}
_ROPE_KEYS = {"rope_type", "type", "rope_theta"}


class CheckpointError(ValueError):
  """A checkpoint directory is missing a file or holds tensors that do not fit the model."""


def _rope_theta(raw: dict, defaults: dict, where: str) -> float:
  """theta, by transformers' priority: rope_scaling, else rope_parameters, else rope_theta."""
  field = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
  params = raw.get(field)
  top = raw.get("rope_theta")
  if params is None:
    return float(top if top is not None else defaults["rope_theta"])
  if not isinstance(params, dict):
    raise CheckpointError(f"{where}: {field}={params!r} must be a dict or null")
  unknown = sorted(set(params) - _ROPE_KEYS)
  if unknown:
    raise CheckpointError(f"{where}: {field} has fields {unknown} that dcjax does not implement "
                          f"(only rope_type 'default' with rope_theta is supported)")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    raise CheckpointError(f"{where}: {field}.rope_type={rope_type!r} is not supported; only "
                          f"'default' RoPE is implemented")
  theta = params.get("rope_theta")
  if theta is not None and top is not None and float(theta) != float(top):
    raise CheckpointError(f"{where}: {field}.rope_theta={theta} and rope_theta={top} disagree; "
                          f"transformers 5 reads the first, a legacy reader the second")
  return float(theta if theta is not None else top if top is not None else defaults["rope_theta"])


def _check_attention_layout(raw: dict, get, num_layers: int, where: str) -> None:
  """Every layer full attention: no sliding window in use, `layer_types` all full."""
  layer_types = raw.get("layer_types")
  if layer_types is not None:
    if len(layer_types) != num_layers:
      raise CheckpointError(f"{where}: layer_types has {len(layer_types)} entries for "
                            f"num_hidden_layers={num_layers}")
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
      raise CheckpointError(f"{where}: layer_types holds {other}; dcjax implements only "
                            f"'full_attention'")
  if get("use_sliding_window") and get("sliding_window") is not None:
    if layer_types is None and get("max_window_layers") < num_layers:
      raise CheckpointError(
          f"{where}: use_sliding_window=true with sliding_window={get('sliding_window')} on layers "
          f">= max_window_layers={get('max_window_layers')}; dcjax implements only full attention")


def read_config_dict(raw: dict, where: str) -> ModelConfig:
  """A ModelConfig from a parsed config.json; `where` names the file in errors."""
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"{where}: model_type={model_type!r} is not supported; expected one "
                          f"of {SUPPORTED_MODEL_TYPES}")
  unknown = sorted(set(raw) - _NUMERIC_FIELDS - _INERT_FIELDS)
  if unknown:
    raise CheckpointError(f"{where}: fields {unknown} are not understood by dcjax (they may "
                          f"change the model's numerics); remove them or add support")
  defaults = DEFAULTS[model_type]

  def get(key):  # an explicit null stays None, as in transformers
    return raw[key] if key in raw else defaults[key]

  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "max_window_layers"):
    if not isinstance(get(key), int) or isinstance(get(key), bool) or get(key) <= 0:
      raise CheckpointError(f"{where}: {key}={get(key)!r} must be a positive integer")
  if get("hidden_act") != "silu":
    raise CheckpointError(f"{where}: hidden_act={get('hidden_act')!r}; only 'silu' is supported")
  if raw.get("mlp_bias"):
    raise CheckpointError(f"{where}: mlp_bias=true; the Qwen2 MLP has no biases")
  num_layers, hidden, heads = (get("num_hidden_layers"), get("hidden_size"),
                               get("num_attention_heads"))
  _check_attention_layout(raw, get, num_layers, where)
  head_dim = raw.get("head_dim") or hidden // heads
  if model_type == "Dream" and head_dim != hidden // heads:
    raise CheckpointError(f"{where}: head_dim={head_dim} but Dream's attention always uses "
                          f"hidden_size // num_attention_heads = {hidden // heads}")

  def token_id(key):
    value = get(key)
    return value[0] if isinstance(value, list) else value

  config = ModelConfig(
      vocab_size=get("vocab_size"), hidden_size=hidden,
      intermediate_size=get("intermediate_size"), num_layers=num_layers, num_heads=heads,
      num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim,
      rope_theta=_rope_theta(raw, defaults, where), rms_norm_eps=float(get("rms_norm_eps")),
      max_position_embeddings=get("max_position_embeddings"),
      initializer_range=get("initializer_range"),
      mask_token_id=token_id("mask_token_id"), pad_token_id=token_id("pad_token_id"),
      bos_token_id=token_id("bos_token_id"), eos_token_id=token_id("eos_token_id"))
  try:
    config.validate(prefix=where)
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  return config


def read_config(path: str) -> tuple[ModelConfig, dict]:
  """(ModelConfig, raw dict) from the `config.json` in checkpoint directory `path` (a gs://
  directory is copied to local disk first: `dcjax.workdir.local_copy`)."""
  from dcjax import workdir  # pylint: disable=import-outside-toplevel
  cfg_file = os.path.join(workdir.local_copy(path), CONFIG_FILE)
  if not os.path.exists(cfg_file):
    raise CheckpointError(f"{cfg_file} not found: a Hugging Face checkpoint directory needs "
                          f"{CONFIG_FILE}")
  try:
    with open(cfg_file) as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{cfg_file}: expected a JSON object, found {type(raw).__name__}")
  return read_config_dict(raw, cfg_file), raw


def tied_embeddings(raw: dict) -> bool:
  """Whether a read config.json ties lm_head to the embedding (both model types: False)."""
  return bool(raw.get("tie_word_embeddings", False))


def hf_config_dict(c: ModelConfig, model_type: str = "qwen2") -> dict:
  """A config.json for `c` that transformers 5 and legacy readers read alike.

  "qwen2" loads in transformers' Qwen2 classes; "Dream" in Dream's remote code (which derives
  head_dim from hidden_size, so it must equal hidden_size // num_heads). lm_head is always
  written as its own tensor (`tie_word_embeddings` false).
  """
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
  if model_type == "Dream" and c.head_dim * c.num_heads != c.hidden_size:
    raise ValueError(f"model_type='Dream' needs head_dim * num_heads == hidden_size "
                     f"({c.head_dim} * {c.num_heads} != {c.hidden_size}): Dream's code derives "
                     f"head_dim; export as model_type='qwen2'")
  arch = "Qwen2ForCausalLM" if model_type == "qwen2" else "DreamModel"
  return {
      "architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
      "rope_theta": c.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
      "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": False, "attention_dropout": 0.0, "use_cache": False,
      "use_sliding_window": False, "sliding_window": None,
      "layer_types": ["full_attention"] * c.num_layers,
      "initializer_range": c.initializer_range, "torch_dtype": c.param_dtype,
      "mask_token_id": c.mask_token_id, "pad_token_id": c.pad_token_id,
      "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
  }
