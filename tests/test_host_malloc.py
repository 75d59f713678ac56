"""glibc malloc settings (dcjax/host_malloc.py; docs/performance.md, "Host memory"): with
them a compiled program's buffers stop faulting their pages in at every call."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = """
import ctypes, json, resource
from dcjax import host_malloc
tuned = host_malloc.tune()
assert host_malloc.tune() == tuned  # applied once, the answer cached
# Where a fresh 16 MiB block comes from: glibc's default mmap threshold (128 KiB until a
# mapped block is freed) maps it; the tuned one (32 MiB) takes it from the heap.
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
              "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(ctypes.c_void_p(block))
# A block above glibc's mmap ceiling (32 MiB; XLA's temporary buffer is one such block):
# tuned, it comes from the heap too, and freeing it keeps the heap (no trimming).
big = libc.malloc(1 << 30)  # never touched: no memory committed
big_mapped = libc.mallinfo2().hblkhd - before
held = libc.mallinfo2().arena
libc.free(ctypes.c_void_p(big))
kept = libc.mallinfo2().arena if held >= 1 << 30 else 0  # heap bytes left after the free
import jax, jax.numpy as jnp
x, w = jnp.ones((2048, 256)), jnp.full((256, 2048), 1e-3)
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) * (x @ (2 * w))))  # 16 MiB temporaries
for _ in range(3):
  f(x, w).block_until_ready()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10
print(json.dumps({"tuned": tuned, "mapped": mapped, "big_mapped": big_mapped, "kept": kept,
                  "faults": faults}))
"""


def _probe(setting: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "DCJAX_HOST_MALLOC"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  if setting is not None:
    env["DCJAX_HOST_MALLOC"] = setting
  proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                        text=True, timeout=300, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_keeps_big_blocks_on_the_heap_and_stops_page_faults():
  """Tuned, 16 MiB and 1 GiB blocks come from the heap (glibc's defaults map them), a
  freed 1 GiB block stays in the heap, and a jitted
  program's 16 MiB temporaries stop faulting their pages in at every call. With the
  defaults the faults depend on which thread's arena serves a buffer (1,350 per call in one
  run, under 1 in another), so only the tuned side's count is asserted."""
  default, tuned = _probe("0"), _probe(None)
  assert default["tuned"] is False and tuned["tuned"] is True
  assert default["mapped"] >= 16 << 20, default
  assert tuned["mapped"] == 0, tuned
  assert default["big_mapped"] >= 1 << 30, default
  assert tuned["big_mapped"] == 0, tuned
  assert tuned["kept"] >= 1 << 30, tuned  # the heap is not trimmed back to the kernel
  # One 16 MiB temporary is 4,096 pages; tuned, a call faults 0-110 (Python's own objects).
  assert tuned["faults"] < 1000, (tuned, default)
