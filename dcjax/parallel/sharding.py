"""Host access to (possibly multi-host) sharded arrays. Parameter shardings and sharded
initialisation live with the model (`dcjax.model.params`)."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x) -> np.ndarray:
  """All of `x` as numpy on every process. `device_get` alone fails on an array whose shards
  live on several hosts (a batch-sharded sampler output on a pod); those are all-gathered."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
