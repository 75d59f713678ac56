"""Multi-process JAX: when to call `jax.distributed.initialize()`, and with what.

- Cloud TPU pod slices (`TPU_WORKER_HOSTNAMES` lists several hosts), SLURM, Open MPI and
  Kubernetes jobs are auto-detected by JAX; `initialize()` is called with no arguments.
- `config.multihost=True` forces that call where detection by environment fails.
- `config.distributed.{coordinator_address, num_processes, process_id}` spell it out (GPU
  clusters, or several processes on one machine, as the multi-host tests do on CPU).
"""

from __future__ import annotations

import os

import jax


def _explicit(config) -> dict | None:
  d = config.get("distributed")
  if d is None or not d.get("coordinator_address"):
    return None
  return dict(coordinator_address=str(d.coordinator_address),
              num_processes=int(d.num_processes), process_id=int(d.process_id))


def validate(config) -> None:
  """Names the field when the explicit settings are half given or out of range."""
  d = config.get("distributed")
  if d is None:
    return
  address = d.get("coordinator_address") or ""
  n = int(d.get("num_processes") or 0)
  i = d.get("process_id")
  i = -1 if i is None else int(i)
  if not address:
    if n or i >= 0:
      raise ValueError("config.distributed.num_processes/process_id are set but "
                       "config.distributed.coordinator_address is empty (expected host:port)")
    return
  if ":" not in str(address):
    raise ValueError(f"config.distributed.coordinator_address={address!r} must be host:port")
  if n < 1:
    raise ValueError(f"config.distributed.num_processes={n} must be >= 1 with a "
                     f"coordinator_address")
  if not 0 <= i < n:
    raise ValueError(f"config.distributed.process_id={i} must be in [0, {n})")


def wanted(config) -> bool:
  """True on a pod slice or cluster, or when the config asks for it."""
  if config.get("multihost", False) or _explicit(config) is not None:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or \
      "JAX_COORDINATOR_ADDRESS" in os.environ


def initialize(config) -> bool:
  """Calls `jax.distributed.initialize` when `wanted`; True if it did."""
  if not wanted(config):
    return False
  kwargs = _explicit(config) or {}
  jax.distributed.initialize(**kwargs)
  return True
