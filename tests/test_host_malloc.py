"""glibc malloc settings (dcjax/host_malloc.py; docs/performance.md, "Host memory"): with
them a compiled program's buffers stop faulting their pages in at every call."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = """
import json, resource
from dcjax import host_malloc
tuned = host_malloc.tune()
assert host_malloc.tune() == tuned  # applied once, the answer cached
import jax, jax.numpy as jnp
x, w = jnp.ones((2048, 256)), jnp.full((256, 2048), 1e-3)
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) * (x @ (2 * w))))  # 16 MiB temporaries
for _ in range(3):
  f(x, w).block_until_ready()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10
print(json.dumps({"tuned": tuned, "faults": faults}))
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
def test_tuned_malloc_stops_per_call_page_faults():
  default, tuned = _probe("0"), _probe(None)
  assert default["tuned"] is False and tuned["tuned"] is True
  # glibc's defaults give the 16 MiB temporaries back and fault them in again (about 1,350
  # faults per call here); tuned, they stay mapped.
  assert default["faults"] > 500, default
  assert tuned["faults"] < 0.1 * default["faults"], (tuned, default)
