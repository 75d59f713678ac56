"""glibc malloc settings for XLA:CPU (docs/performance.md, "Host memory").

XLA:CPU allocates every temporary and output buffer afresh at each call of a compiled
program. With glibc's defaults, freed buffers go back to the kernel (per-thread arenas,
`mmap` for blocks over 128 KiB-32 MiB, heap trimming), so the next step faults every page in
again: the tiny train step took 29,600 minor page faults, about 30 % of its time, and the
small one maps and unmaps its 1.2 GB temporary buffer at every step (290,000 faults).
`tune()` keeps freed memory in the process instead: one arena, no `mmap` for large blocks
(they come from the heap), no heap trimming, and 256 MiB of padding at each heap growth.
The process keeps its peak heap for its lifetime, which is what a training job wants. Call
it before the first large allocation; it changes nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
# Values are C ints: -1 is glibc's "never trim" (mallopt(3)); a threshold above 2**31 - 1
# would wrap (4 GiB wraps to 0: trim at every free).
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 32 << 20), (M_MMAP_MAX, 0),
            (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 256 << 20))
ENV = "DCJAX_HOST_MALLOC"   # "0": leave malloc alone

_applied: bool | None = None


def tune() -> bool:
  """Applies SETTINGS once per process; True when glibc accepted all of them."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and others have no mallopt
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  assert all(-2**31 <= value < 2**31 for _, value in SETTINGS), SETTINGS  # C ints
  _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  return _applied
