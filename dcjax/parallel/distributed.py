"""Multi-process JAX: when to call `jax.distributed.initialize()`, and with what.

- Cloud TPU pod slices (`TPU_WORKER_HOSTNAMES` lists several hosts), SLURM, Open MPI and
  Kubernetes jobs are auto-detected by JAX; `initialize()` is called with no arguments.
- `config.multihost=True` forces that call where detection by environment fails.
- `config.distributed.{coordinator_address, num_processes, process_id}` spell it out (GPU
  clusters, or several processes on one machine, as the multi-host tests do on CPU).

On a Cloud TPU pod every host connects to process 0 on TCP port 8482 (jax >= 0.8.1; before, 8476).
A network that does not allow it between the VMs makes the start-up wait, and JAX then aborts
the process with a bare DEADLINE_EXCEEDED. Here a watchdog ends it first, after
`DCJAX_DISTRIBUTED_TIMEOUT` seconds (launch/gcp/run.sh sets it; unset: just under JAX's 300),
with exit status 1 and an `error:` line that names the coordinator, its port and the firewall
rule to add (launch/gcp/setup.sh checks for the rule and creates it).
"""

from __future__ import annotations

import os
import sys
import threading

import jax

# jax 0.10.2's port for the coordinator on Cloud TPU (jax._src.clusters.cloud_tpu_cluster;
# JAX_COORDINATOR_PORT overrides it). tests/test_launch.py checks both against jax.
TPU_COORDINATOR_PORT = 8482
TIMEOUT_ENV = "DCJAX_DISTRIBUTED_TIMEOUT"
_JAX_TIMEOUT = 300  # jax.distributed.initialize's initialization_timeout default
# What the coordination service's errors say when a host cannot reach the coordinator.
_UNREACHABLE = ("DEADLINE_EXCEEDED", "Deadline Exceeded", "UNAVAILABLE", "timed out",
                "Connection refused", "failed to connect")


class CoordinatorUnreachableError(RuntimeError):
  """jax.distributed.initialize() failed: the hosts could not all reach the coordinator."""


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


def _timeout() -> int | None:
  value = os.environ.get(TIMEOUT_ENV)
  if not value:
    return None
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f"{TIMEOUT_ENV}={value!r} must be a whole number of seconds >= 1")
  return int(value)


def coordinator(config) -> str:
  """Where the processes meet, as far as it is known before JAX looks it up (for messages)."""
  explicit = _explicit(config)
  if explicit is not None:
    return explicit["coordinator_address"]
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return os.environ["JAX_COORDINATOR_ADDRESS"]
  port = os.environ.get("JAX_COORDINATOR_PORT") or TPU_COORDINATOR_PORT
  host = os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")[0] or "worker 0"
  return f"{host}:{port}"


def unreachable_message(address: str, seconds: int, cause: str | None = None) -> str:
  port = address.rsplit(":", 1)[-1]
  what = f"failed ({cause})" if cause else f"did not finish in {seconds} s"
  return (f"jax.distributed.initialize() {what}: the hosts could not "
          f"all reach the coordinator at {address} (TCP port {port}). Every host must reach "
          f"process 0 on TCP port {port}: allow it between the VMs with an ingress firewall rule "
          f"(launch/gcp/setup.sh checks for one and creates it: gcloud compute firewall-rules "
          f"create NETWORK-allow-tcp-{port} --network=NETWORK --direction=INGRESS --action=ALLOW "
          f"--rules=tcp:{port} --source-ranges=10.0.0.0/8,172.16.0.0/12,192.168.0.0/16), or "
          f"choose an open port with JAX_COORDINATOR_PORT. Also check that every worker started "
          f"the same command (launch/gcp/logs.sh --worker all).")


def _give_up(message: str) -> None:
  # JAX aborts the process itself (a fatal log, SIGABRT) when its own timeout passes, so the
  # watchdog ends it first, with the cause named and the exit status of any other error.
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def initialize(config) -> bool:
  """Calls `jax.distributed.initialize` when `wanted`; True if it did.

  A watchdog ends the process (status 1, the message on stderr) when the call has not returned
  after `DCJAX_DISTRIBUTED_TIMEOUT` seconds (JAX then gets 30 s more, so the watchdog fires
  first), or just before JAX's own 300 s when that variable is unset.
  """
  if not wanted(config):
    return False
  kwargs = _explicit(config) or {}
  timeout = _timeout()
  if timeout is None:
    seconds = _JAX_TIMEOUT - 15
  else:
    seconds = timeout
    kwargs["initialization_timeout"] = timeout + 30
  message = unreachable_message(coordinator(config), seconds)
  watchdog = threading.Timer(seconds, _give_up, args=(message,))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, OSError) as e:
    if not any(s in str(e) for s in _UNREACHABLE):
      raise
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise CoordinatorUnreachableError(
        unreachable_message(coordinator(config), seconds, cause)) from e
  finally:
    watchdog.cancel()
  return True
