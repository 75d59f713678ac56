"""Hugging Face checkpoints (Dream, DiffuCoder, Qwen2 layouts) in and out.

`load_pretrained` reads `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) and places each tensor straight into its sharded device
layout: host memory holds about one tensor at a time (a 7B checkpoint is 15 GB).
`save_pretrained` writes a Qwen2 `config.json` and safetensors shards that
`transformers.Qwen2ForCausalLM.from_pretrained` loads back.

Layouts: torch Linear stores [out, in]; dcjax stores kernels [in, out] with the head axes
split out (q_proj [D, H, Dh], o_proj [H, Dh, D]) and the layers stacked on axis 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dcjax import workdir as workdir_lib
from dcjax.model.config import ModelConfig
from dcjax.model.params import abstract_params, param_shardings
# config.json handling lives in hf_config; its names are re-exported here for callers.
from dcjax.model.hf_config import (CONFIG_FILE, SUPPORTED_MODEL_TYPES, CheckpointError,
                                   hf_config_dict, read_config, tied_embeddings)

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One dcjax parameter and its Hugging Face tensor(s) (one per layer when stacked)."""

  path: tuple[str, ...]        # key path in the params pytree
  hf_name: str                 # with "{i}" for the layer index when per_layer
  per_layer: bool
  to_dcjax: Callable[[np.ndarray], np.ndarray]   # HF layout -> dcjax layout (one layer)
  to_hf: Callable[[np.ndarray], np.ndarray]      # dcjax layout (one layer) -> HF layout


def tensor_maps(c: ModelConfig) -> list[TensorMap]:
  """The full name and layout correspondence for a config."""
  d, h, kv, dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  t = np.transpose

  def heads_in(n):  # [n*Dh, D] -> [D, n, Dh]
    return (lambda w: t(w).reshape(d, n, dh)), (lambda k: t(k.reshape(d, n * dh)))

  def heads_bias(n):  # [n*Dh] -> [n, Dh]
    return (lambda b: b.reshape(n, dh)), (lambda b: b.reshape(n * dh))

  maps = [
      TensorMap(("embed_tokens", "embedding"), "model.embed_tokens.weight", False,
                lambda w: w, lambda w: w),
      TensorMap(("norm", "weight"), "model.norm.weight", False, lambda w: w, lambda w: w),
      TensorMap(("lm_head", "kernel"), "lm_head.weight", False, t, t),
  ]
  layer = "model.layers.{i}."
  for name, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
    maps.append(TensorMap(("layers", "self_attn", name, "kernel"),
                          f"{layer}self_attn.{name}.weight", True, *heads_in(n)))
    maps.append(TensorMap(("layers", "self_attn", name, "bias"),
                          f"{layer}self_attn.{name}.bias", True, *heads_bias(n)))
  maps.append(TensorMap(("layers", "self_attn", "o_proj", "kernel"),
                        f"{layer}self_attn.o_proj.weight", True,
                        lambda w: t(w).reshape(h, dh, d), lambda k: t(k.reshape(h * dh, d))))
  for name in ("gate_proj", "up_proj", "down_proj"):
    maps.append(TensorMap(("layers", "mlp", name, "kernel"), f"{layer}mlp.{name}.weight", True,
                          t, t))
  for name in ("input_layernorm", "post_attention_layernorm"):
    maps.append(TensorMap(("layers", name, "weight"), f"{layer}{name}.weight", True,
                          lambda w: w, lambda w: w))
  return maps


# ----------------------------------------------------------------------------- reading


class _Tensors:
  """Name -> lazily read numpy tensor over one file or an index of shards."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._open = safe_open
    self._handles = {}
    self._aliases: dict[str, str] = {}
    index_file, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    if os.path.exists(index_file):
      with open(index_file) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
      for fname in sorted(set(self.files.values())):
        if not os.path.exists(fname):
          raise CheckpointError(f"{index_file} lists {fname}, which does not exist")
    elif os.path.exists(single):
      self.files = {name: single for name in self._handle(single).keys()}
    else:
      raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

  def alias(self, name: str, source: str) -> None:
    """Reads `name` from tensor `source` (tied embeddings)."""
    self._aliases[name] = source
    self.files[name] = self.files[source]

  def names(self) -> set[str]:
    return set(self.files)

  def _handle(self, fname):
    if fname not in self._handles:
      try:
        self._handles[fname] = self._open(fname, "numpy").__enter__()
      except Exception as e:  # safetensors raises its own error type without the path
        raise CheckpointError(f"{fname}: cannot read the safetensors file "
                              f"({type(e).__name__}: {e}); is it truncated or corrupt?") from e
    return self._handles[fname]

  def shape(self, name: str) -> tuple[int, ...]:
    name = self._aliases.get(name, name)
    return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    name = self._aliases.get(name, name)
    fname = self.files[name]
    try:
      return self._handle(fname).get_tensor(name)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{fname}: cannot read tensor {name} ({type(e).__name__}: {e}); "
                            f"is the file truncated or corrupt?") from e

  def close(self):
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()


def _check_tensors(tensors: _Tensors, c: ModelConfig, path: str) -> None:
  """Every expected tensor present with the expected shape, nothing unexpected."""
  shapes = jax.tree.map(lambda x: x.shape, jax.tree.map(lambda b: b.unbox(), abstract_params(c),
                                                        is_leaf=lambda b: hasattr(b, "unbox")))
  expected = set()
  for m in tensor_maps(c):
    dcjax_shape = _get(shapes, m.path)
    layer_shape = dcjax_shape[1:] if m.per_layer else dcjax_shape
    hf_shape = m.to_hf(np.empty(layer_shape, np.uint8)).shape
    for i in range(c.num_layers if m.per_layer else 1):
      name = m.hf_name.format(i=i)
      expected.add(name)
      if name not in tensors.names():
        raise CheckpointError(f"{path}: tensor {name} is missing (expected shape {hf_shape})")
      found = tensors.shape(name)
      if found != hf_shape:
        raise CheckpointError(f"{tensors.files[name]}: tensor {name} has shape {found}, "
                              f"expected {hf_shape} from {CONFIG_FILE}")
  extra = sorted(n for n in tensors.names() - expected if not n.endswith(IGNORED_SUFFIXES))
  if extra:
    raise CheckpointError(f"{path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}"
                          f" ({len(extra)} in all) in {tensors.files[extra[0]]}")


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _put(array: np.ndarray, sharding) -> jax.Array:
  """A host array into its (possibly multi-host) sharded layout, shard by shard."""
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _stack_layers(shape, dtype, sharding, layers: Iterator[np.ndarray]) -> jax.Array:
  """Builds a [num_layers, ...] array on device one layer at a time (host holds one layer)."""
  layer_sharding = None
  if sharding is not None:
    layer_sharding = jax.sharding.NamedSharding(sharding.mesh,
                                                jax.sharding.PartitionSpec(*sharding.spec[1:]))
  zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
  update = jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0),
                   donate_argnums=0, out_shardings=sharding)
  out = zeros()
  for i, layer in enumerate(layers):
    out = update(out, _put(layer, layer_sharding), i)
  return out


def load_pretrained(path: str, dtype: str = "float32", mesh=None, *,
                    compute_dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from a Hugging Face checkpoint directory.

  `dtype` is the parameter dtype (tensors are cast on the host one at a time);
  `compute_dtype` sets the config's matmul dtype (defaults to `dtype`). With a mesh, each
  tensor is placed directly into the sharding the logical-axis rules give it.
  """
  path = workdir_lib.local_copy(path)  # gs:// -> a local copy, which safetensors memory-maps
  config, raw = read_config(path)
  config = dataclasses.replace(config, param_dtype=dtype, dtype=compute_dtype or dtype)
  tensors = _Tensors(path)
  try:
    if tied_embeddings(raw):  # transformers ties lm_head to the embedding, file or no file
      tensors.alias("lm_head.weight", "model.embed_tokens.weight")
    _check_tensors(tensors, config, path)
    shardings = None
    if mesh is not None:
      shardings = param_shardings(config, mesh)
    np_dtype = jnp.dtype(dtype)
    params: dict = {}
    for m in tensor_maps(config):
      sharding = None if shardings is None else _get(shardings, m.path)
      if m.per_layer:
        layers = (m.to_dcjax(tensors.get(m.hf_name.format(i=i))).astype(np_dtype)
                  for i in range(config.num_layers))
        first_shape = m.to_dcjax(np.empty(tensors.shape(m.hf_name.format(i=0)), np.uint8)).shape
        value = _stack_layers((config.num_layers,) + first_shape, np_dtype, sharding, layers)
      else:
        value = _put(np.ascontiguousarray(m.to_dcjax(tensors.get(m.hf_name)).astype(np_dtype)),
                     sharding)
      _set(params, m.path, value)
  finally:
    tensors.close()
  return config, params


# ----------------------------------------------------------------------------- writing


def _fetch(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host sharded) array on the host of every process."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_pretrained(config: ModelConfig, params, path: str, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 1024**3, model_type: str = "qwen2") -> None:
  """Writes config.json and safetensors (sharded with an index above `max_shard_bytes`).

  Host memory peaks at about one shard file. Only process 0 writes.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  out_dtype = jnp.dtype(dtype or config.param_dtype)
  maps = tensor_maps(config)
  # Plan the shard files from shapes alone, so each file is written in one go.
  plan: list[list[tuple[str, TensorMap, int]]] = [[]]
  size = 0
  for m in maps:
    leaf = _get(params, m.path)
    layer_bytes = int(np.prod(leaf.shape[1:] if m.per_layer else leaf.shape)) * out_dtype.itemsize
    for i in range(config.num_layers if m.per_layer else 1):
      if plan[-1] and size + layer_bytes > max_shard_bytes:
        plan.append([])
        size = 0
      plan[-1].append((m.hf_name.format(i=i), m, i))
      size += layer_bytes
  write = jax.process_index() == 0
  if write:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump(hf_config_dict(dataclasses.replace(config, param_dtype=out_dtype.name),
                               model_type), f, indent=2)
  names = [SINGLE_FILE] if len(plan) == 1 else [
      f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
  weight_map = {}
  for fname, entries in zip(names, plan):
    shard = {}
    for hf_name, m, i in entries:
      leaf = _get(params, m.path)
      value = _fetch(leaf[i] if m.per_layer else leaf)
      shard[hf_name] = np.ascontiguousarray(m.to_hf(value).astype(out_dtype))
      weight_map[hf_name] = fname
    if write:
      save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
  if write and len(plan) > 1:
    total = sum(int(np.prod(_get(params, m.path).shape)) for m in maps) * out_dtype.itemsize
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
