"""What the Colab notebooks share with the rest of the tree: the repository URL behind their
"Open in Colab" links and setup cells, and the memory check `notebooks/sampler.ipynb` runs
before it loads a checkpoint (BUILD.md, "Colab").

REPO_URL is set here only; the README's and notebooks' links and the setup cells' `git clone`
repeat it, and tests/test_notebooks.py checks every copy against it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from dcjax.model.config import ModelConfig
from dcjax.model.params import abstract_params

REPO_URL = "https://github.com/dcjax/dcjax"
BRANCH = "main"
GiB = 2**30
# "Fits" means at most this fraction of a device's memory, as in BUILD.md's memory table.
FIT_FRACTION = 0.9
# HBM of one JAX device by TPU generation, for devices that report no `memory_stats()`.
# TPU_ACCELERATOR_TYPE names the runtime: Colab's free TPU is "v5e-1" (one 16 GiB chip).
TPU_DEVICE_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5litepod": 16, "v5e": 16, "v5p": 95, "v6e": 32}
# Larger runtimes the report offers when a checkpoint does not fit: (name, devices, GiB each).
LARGER_RUNTIMES = (("v6e-1", 1, 32), ("v5e-8", 8, 16), ("v5p-8", 4, 95))


def colab_url(notebook: str) -> str:
  """The "Open in Colab" link of notebooks/<notebook> on REPO_URL's BRANCH."""
  repo = REPO_URL.removeprefix("https://github.com/")
  return f"https://colab.research.google.com/github/{repo}/blob/{BRANCH}/notebooks/{notebook}"


def tpu_device_bytes(accelerator_type: str) -> int | None:
  """Memory of one device of a TPU runtime type ("v5e-1", "v5litepod-8", "v6e-1", ...)."""
  generation = accelerator_type.lower().split("-")[0]
  gib = TPU_DEVICE_GIB.get(generation)
  return None if gib is None else gib * GiB


def device_memory(devices=None) -> tuple[int | None, str]:
  """(bytes of one device, where that figure comes from); (None, why) when unknown."""
  device = (devices or jax.devices())[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # some backends raise instead of None
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats()"
  accelerator = os.environ.get("TPU_ACCELERATOR_TYPE", "")
  if device.platform == "tpu" and tpu_device_bytes(accelerator):
    return tpu_device_bytes(accelerator), f"TPU_ACCELERATOR_TYPE={accelerator}"
  if device.platform == "cpu":  # host devices share the machine's memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // len(devices or jax.devices()), "host memory"
  return None, f"{device.device_kind} reports no memory"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes one device holds while the sampler runs `batch` rows of `length` tokens."""

  num_params: int
  params_bytes: int  # the whole model in its parameter dtype
  activation_bytes: int  # per device: logits and their softmax temporaries, KV, one layer
  num_devices: int
  device_bytes: int | None
  device_source: str

  @property
  def per_device_bytes(self) -> int:  # parameters are sharded over every device (fsdp)
    return math.ceil(self.params_bytes / self.num_devices) + self.activation_bytes

  @property
  def fits(self) -> bool | None:
    if self.device_bytes is None:
      return None
    return self.per_device_bytes <= FIT_FRACTION * self.device_bytes

  def summary(self) -> str:
    device = ("unknown" if self.device_bytes is None
              else f"{self.device_bytes / GiB:.1f} GiB ({self.device_source})")
    return (f"{self.num_params / 1e9:.2f}B parameters: {self.params_bytes / GiB:.2f} GiB over "
            f"{self.num_devices} device(s) + {self.activation_bytes / GiB:.2f} GiB activations "
            f"= {self.per_device_bytes / GiB:.2f} GiB per device; device memory {device}")


def sampler_memory(config: ModelConfig, *, batch: int, length: int, devices=None,
                   device_bytes: int | None = None, device_source: str = "") -> MemoryEstimate:
  """Estimates what sampling `batch` rows of `length` tokens (prompt + canvas) needs.

  Parameters: every leaf of the model's pytree in `config.param_dtype` (shapes from
  `jax.eval_shape`; nothing is allocated). Per device, for its share of the batch: fp32
  logits over every position with three same-sized softmax / top-p temporaries, a KV cache
  for every layer (what the cached sampler keeps), one layer's hidden and MLP activations and,
  for the `xla` attention kernel, its [heads, L, L] fp32 scores.
  """
  devices = devices or jax.devices()
  if device_bytes is None:
    device_bytes, device_source = device_memory(devices)
  n = len(devices)
  leaves = jax.tree.leaves(abstract_params(config))
  num_params = sum(int(np.prod(x.value.shape if hasattr(x, "value") else x.shape))
                   for x in leaves)
  params_bytes = num_params * np.dtype(jax.numpy.dtype(config.param_dtype)).itemsize
  rows = math.ceil(batch / n)
  act = np.dtype(jax.numpy.dtype(config.dtype)).itemsize
  tokens = rows * length
  logits = 4 * tokens * config.vocab_size * 4
  kv = 2 * config.num_layers * tokens * config.num_kv_heads * config.head_dim * act
  layer = tokens * (4 * config.hidden_size + 3 * config.intermediate_size) * act
  scores = rows * config.num_heads * length * length * 4 if config.attention_impl == "xla" else 0
  return MemoryEstimate(num_params, params_bytes, logits + kv + layer + scores, n,
                        device_bytes, device_source)


def fit_report(estimate: MemoryEstimate, config: ModelConfig, *, batch: int,
               length: int) -> str:
  """Why `estimate` does not fit, and what would: smaller models, dtypes, larger runtimes."""
  budget = FIT_FRACTION * estimate.device_bytes * estimate.num_devices
  lines = [f"This checkpoint does not fit: {estimate.summary()}; at most "
           f"{FIT_FRACTION:.0%} of it may be used. What fits instead:",
           '- HF_DIR = "": the random tiny model (or pretrain.ipynb\'s export)']
  bf16 = np.dtype(jax.numpy.dtype("bfloat16")).itemsize
  largest = (budget - estimate.activation_bytes * estimate.num_devices) / bf16
  if largest > 0:
    lines.append(f"- a checkpoint of at most {largest / 1e9:.1f}B parameters in bfloat16")
  if config.param_dtype != "bfloat16":
    half = estimate.params_bytes / np.dtype(jax.numpy.dtype(config.param_dtype)).itemsize * bf16
    if (half / estimate.num_devices + estimate.activation_bytes
        <= FIT_FRACTION * estimate.device_bytes):
      lines.append('- PARAM_DTYPE = "bfloat16"')
  bigger = dataclasses.replace(config, param_dtype="bfloat16", dtype="bfloat16")
  for name, n, gib in LARGER_RUNTIMES:
    other = sampler_memory(bigger, batch=batch, length=length, devices=[None] * n,
                           device_bytes=gib * GiB, device_source=name)
    if other.fits:
      lines.append(f"- a {name} runtime ({n} x {gib} GiB; Colab Pro or a TPU VM, "
                   f"launch/gcp/README.md) in bfloat16: "
                   f"{other.per_device_bytes / GiB:.1f} GiB per device")
  return "\n".join(lines)
