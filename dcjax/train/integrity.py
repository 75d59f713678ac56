"""Fingerprints of a checkpointed state's arrays (recorded at save, checked at restore) and
the one-line error texts the checkpointer builds from orbax / TensorStore exceptions.

orbax 0.12.8 stores no checksum of the array data (its zarr3 layout puts a crc32c on the
shard index only, and the default zarr2 layout none), so a flipped block in a data file
restores silently. Here every array gets a 64-bit fingerprint computed on its devices by one
jitted reduction: the wrapping uint32 sum over elements of mix(bits, position), for two
seeds. Integer sums do not depend on order, so the value is the same for any sharding, device
count or host count, and no array is copied to the host. `mix` is a bijection in the bits for
a fixed position, so any single changed element always changes the sum. The same pass tells
whether each floating-point array is finite, so a NaN state is never saved.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dcjax import workdir as workdir_lib

METHOD = "dcjax-fingerprint-v1"  # recorded with the fingerprints; bump if the hash changes
_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _fmix32(h):
  """murmur3's finaliser: a bijection on uint32 that spreads every input bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _as_uint32(x):
  """The array's raw bits as uint32 (8-byte types gain a trailing axis of 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size in (1, 2):
    return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint32)


def _positions(shape):
  """Row-major element index (mod 2**32) of every element, built from iotas (no host data)."""
  pos = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    pos = pos + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return pos


def _leaf(x):
  bits = _as_uint32(x)
  pos = _positions(bits.shape)
  mixed = [_fmix32(bits * np.uint32((2 * s + 1) % 2**32) + _fmix32(pos ^ np.uint32(s)))
           for s in _SEEDS]
  bad = ~jnp.isfinite(x) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros(x.shape, bool)
  if bits.ndim > x.ndim:  # 8-byte types: each element's flag repeated over its two words
    bad = jnp.broadcast_to(bad[..., None], bits.shape)

  def combine(a, b):  # wrapping sums of the mixes; "any" of the non-finite flags
    return a[0] + b[0], a[1] + b[1], a[2] | b[2]

  # One variadic reduction, which XLA fuses with the elementwise work: no array-sized
  # temporary (separate jnp.sum / jnp.all kept the shared iota and bits, 2.25x the array).
  h0, h1, any_bad = lax.reduce((*mixed, bad), (np.uint32(0), np.uint32(0), np.bool_(False)),
                               combine, tuple(range(bits.ndim)))
  return jnp.stack([h0, h1]), ~any_bad


_fingerprint_tree = jax.jit(lambda tree: jax.tree.map(_leaf, tree))


@dataclasses.dataclass(frozen=True)
class Fingerprints:
  """{array path: 16 hex digits} and the paths of arrays holding NaN or Inf, in tree order."""

  arrays: dict[str, str]
  non_finite: list[str]

  def to_json(self) -> dict:
    return dict(method=METHOD, arrays=self.arrays)


def fingerprint(tree) -> Fingerprints:
  """Fingerprints every array leaf of `tree` (global, possibly sharded, jax arrays).

  A collective under multi-host JAX: every process calls it with its part of the same arrays.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  paths = [jax.tree_util.keystr(path) for path, _ in leaves]
  groups: dict[tuple, list[int]] = {}  # one jitted call per set of devices (usually one)
  for i, (_, leaf) in enumerate(leaves):
    sharding = getattr(leaf, "sharding", None)
    devices = tuple(sorted(d.id for d in sharding.device_set)) if sharding is not None else ()
    groups.setdefault(devices, []).append(i)
  results = [None] * len(leaves)
  for indices in groups.values():
    for i, r in zip(indices, jax.device_get(_fingerprint_tree([leaves[i][1] for i in indices]))):
      results[i] = r
  arrays = {p: f"{int(h[0]):08x}{int(h[1]):08x}" for p, (h, _) in zip(paths, results)}
  return Fingerprints(arrays=arrays, non_finite=[p for p, (_, ok) in zip(paths, results)
                                                 if not ok])


def differing(recorded: dict, current: Fingerprints) -> list[str]:
  """Paths whose fingerprint differs from the record (or that only one side has), sorted."""
  arrays = recorded.get("arrays", {})
  return sorted(p for p in set(arrays) | set(current.arrays)
                if arrays.get(p) != current.arrays.get(p))


# ---- one-line error texts ----------------------------------------------------------------

# TensorStore appends its whole JSON spec to messages; the first part names the array and file.
_TS_NOISE = re.compile(r"\s*(See full TensorStore details|\[source locations=|\[tensorstore_spec)"
                       r".*$")


def root_cause(e: BaseException) -> BaseException:
  """The innermost exception of `e`'s chain (orbax wraps TensorStore's real error)."""
  seen = {id(e)}
  while True:
    nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if nxt is None or id(nxt) in seen:
      return e
    seen.add(id(nxt))
    e = nxt


def cause_line(e: BaseException) -> str:
  """`Type: first line` of the root cause, without TensorStore's spec dump."""
  root = root_cause(e)
  lines = str(root).strip().splitlines()
  text = lines[0] if lines else ""
  text = _TS_NOISE.sub("", text)
  return f"{type(root).__name__}: {text}" if text else type(root).__name__


def is_disk_full(e: BaseException) -> bool:
  root = root_cause(e)
  return getattr(root, "errno", None) == errno.ENOSPC or "No space left on device" in str(root)


def free_space(directory: str) -> str:
  """e.g. '1.5 MiB free' on the file system holding `directory`, or why that is unknown."""
  if workdir_lib.is_remote(directory):
    return "free space unknown (remote storage)"
  path = directory
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    free = float(shutil.disk_usage(path).free)
  except OSError as e:
    return f"free space unknown ({e})"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if free < 1024:
      break
    free /= 1024
  else:
    unit = "TiB"
  return f"{free:.1f} {unit} free"
