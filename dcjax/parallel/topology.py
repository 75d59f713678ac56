"""TPU slices by their gcloud names, as devices a program can be compiled for on any host.

`devices("v5p-64")` returns the 32 chips of a v5p-64 slice from libtpu's topology description
(`jax.experimental.topologies`): a mesh built over them and `jit(...).lower(...).compile()`
give the exact program and per-chip memory the pod would run, on a CPU-only machine
(docs/compile.md). Needs libtpu (`pip install -e '.[test]'` or `'.[tpu]'`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str                 # as gcloud spells it: v5p-64
  generation: str           # libtpu's name: v4, v5p, v5e, v6e
  chips: int
  shape: tuple[int, ...]    # the chip torus, e.g. (2, 4, 4)
  hbm_bytes: int            # per chip (one JAX device)

  @property
  def topology_name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"


# gcloud prefix -> (libtpu generation, accelerator-name units per chip, torus rank, HBM GiB per
# chip). v4 and v5p count TensorCores (two per chip), v5e and v6e count chips.
GENERATIONS = {"v4": ("v4", 2, 3, 32), "v5p": ("v5p", 2, 3, 95),
               "v5litepod": ("v5e", 1, 2, 16), "v6e": ("v6e", 1, 2, 32)}


def _torus(chips: int, rank: int) -> tuple[int, ...]:
  """gcloud's default slice shape: 3-D slices start at 2x2x1, 2-D at 1x1; the smallest
  dimension (the last of equals) doubles until the chips are covered (v5p-64 -> 2x4x4)."""
  if chips & (chips - 1):
    raise ValueError(f"{chips} chips is not a power of two")
  dims = [2, 2, 1] if rank == 3 and chips >= 4 else [1] * rank
  while math.prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return tuple(dims)


def parse(name: str) -> Slice:
  """'v5p-64' -> Slice; raises ValueError naming the accepted forms."""
  match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", name.strip())
  if not match:
    raise ValueError(f"TPU slice {name!r} is not one of v4-N, v5p-N, v5litepod-N (v5e), v6e-N "
                     "(gcloud's accelerator-type names)")
  prefix, count = match.group(1), int(match.group(2))
  generation, units, rank, hbm_gib = GENERATIONS[prefix]
  if count % units or count < units:
    raise ValueError(f"TPU slice {name!r}: {prefix}-N counts TensorCores, so N must be a "
                     f"multiple of {units}")
  chips = count // units
  try:
    shape = _torus(chips, rank)
  except ValueError as e:
    raise ValueError(f"TPU slice {name!r}: {e}") from None
  return Slice(name, generation, chips, shape, hbm_gib * GIB)


def devices(tpu_slice: Slice, num_slices: int = 1) -> list:
  """The slice's devices (num_slices copies over DCN), for `make_mesh(..., devices=...)`."""
  # No metadata server and no lockfile: only topology descriptions are built here, and other
  # processes on this host may hold libtpu too.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - part of jax
    raise RuntimeError(f"jax.experimental.topologies is unavailable: {e}") from None
  host_bounds = (2, 2, 1) if tpu_slice.chips >= 4 else (1, 1, 1)
  if tpu_slice.generation in ("v5e", "v6e") and tpu_slice.chips == 8:
    host_bounds = (2, 4, 1)  # the 8-chip v5e / v6e host
  chip_config = "megacore" if tpu_slice.generation == "v4" else "default"
  try:
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=tpu_slice.topology_name, chip_config_name=chip_config,
        chips_per_host_bounds=host_bounds, num_slices=num_slices)
  except Exception as e:  # libtpu missing or refusing the shape
    raise RuntimeError(
        f"cannot describe TPU slice {tpu_slice.name} ({tpu_slice.topology_name}, "
        f"{num_slices} slice(s)): {e}. Ahead-of-time TPU compiles need libtpu: "
        "pip install -e '.[test]' (or '.[tpu]')") from None
  return list(topology.devices)
