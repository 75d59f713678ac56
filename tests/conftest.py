"""Test set-up: 8 host CPU devices so sharded code runs on a real 2x2x2 mesh, a shared XLA
compilation cache for the session, and the malloc settings `python -m dcjax.main` runs under."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache per test session, shared with the processes and notebook kernels
# the tests start: many tests compile the same small programs (orbax's slicing, optimizer
# updates, the same train step twice around a resume); it cut ~20% off the checkpoint, workdir
# and GRPO-loop tests on 2 cores. A cache directory the caller set is used as is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dcjax-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The tests run the product under the settings its entry points set (dcjax/host_malloc.py;
# docs/performance.md, "Host memory"): with glibc's defaults every XLA:CPU call faults its
# buffers' pages in again (on 2 cores the issue-18 study test spent 98 s in the kernel with
# them, 21 s tuned, with identical results). DCJAX_HOST_MALLOC=0 opts out.
from dcjax import host_malloc  # noqa: E402  (imports neither jax nor numpy)

host_malloc.tune()

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
  """`$DCJAX_SHARED_DATA`, else `../shared/data` beside the repository, else None."""
  env = os.environ.get("DCJAX_SHARED_DATA")
  candidates = [pathlib.Path(env)] if env else []
  candidates.append(REPO.parent / "shared" / "data")
  for path in candidates:
    if path.is_dir():
      return path
  return None


def require_shared_file(name: str) -> pathlib.Path:
  """The path of a shared data file; skips where absent, fails under CI=true."""
  directory = shared_data_dir()
  path = directory / name if directory else None
  if path is None or not path.exists():
    message = f"shared data file {name} not found (set DCJAX_SHARED_DATA)"
    if os.environ.get("CI") == "true":
      pytest.fail(message + "; CI must not skip it")
    pytest.skip(message)
  return path


@pytest.fixture
def mbpp_path() -> pathlib.Path:
  return require_shared_file("mbpp.jsonl")
