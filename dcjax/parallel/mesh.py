"""Device mesh from config: axes ('data', 'fsdp', 'tensor'); one -1 entry takes the rest."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh

from dcjax.parallel.rules import MESH_AXES


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the -1 entry; raises ValueError naming the field when it cannot."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  fill = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
  bad = [name for name, size in zip(MESH_AXES, sizes) if size == 0 or size < -1]
  if bad:
    raise ValueError(f"config.mesh.{bad[0]}={mesh_config[bad[0]]} must be a positive size or -1")
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {fill}")
  known = math.prod(size for size in sizes if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"(product {known}) to fill config.mesh.{fill[0]}=-1")
    sizes[MESH_AXES.index(fill[0])] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} holds {known} devices but "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: shardings are propagated by XLA from the in/out shardings and the
  # logical constraints, as in MaxText; Explicit axes would turn constraints into asserts.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
