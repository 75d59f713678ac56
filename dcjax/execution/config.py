"""Settings of the sandboxed code runner: resource limits, pool size, privilege drop."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

from dcjax.execution.private_tmp import covered_dirs


def default_python() -> str:
  """`sys.executable`, or its resolved target when a private tmpfs would hide it."""
  hidden = any(sys.executable == d or sys.executable.startswith(d.rstrip("/") + "/")
               for d in covered_dirs())
  return os.path.realpath(sys.executable) if hidden else sys.executable


def host_cpus() -> int:
  """CPUs this process may run on (the affinity mask where the OS has one)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # macOS
    return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """How untrusted programs are run.

  Attributes:
    timeout_s: wall-clock limit per program; the whole process group is killed after it.
    memory_mb: address-space limit (RLIMIT_AS) of each process of the program.
    tmp_mb: size of the program's private tmpfs, which its /tmp, /dev/shm, /var/tmp and
      working directory share (see dcjax.execution.private_tmp); a full one is ENOSPC.
      None means `memory_mb`. Where the host allows no mount namespace, the cap on its
      private working directory (enforced by a watchdog that kills the program).
    cpu_s: CPU-time limit (RLIMIT_CPU) per process; None means `timeout_s + 1`, so a
      single-threaded busy loop meets the wall-clock limit first.
    file_size_mb: largest file the program may write (RLIMIT_FSIZE); its stdout and
      stderr are files too, so this also caps its output on disk.
    max_processes: processes and threads the program may add (RLIMIT_NPROC is set to
      this plus what its user already runs plus one per pool worker).
    max_open_files: RLIMIT_NOFILE.
    output_limit_bytes: how much of the end of stdout and of stderr comes back in a Result.
    workers: programs run at once; None means one per CPU of the host.
    queue_size: programs submitted ahead of the results consumed (the bounded queue);
      None means twice `workers`.
    drop_privileges: run programs as `sandbox_user`. None means "when running as root".
    sandbox_user: user name or numeric uid that programs run as when privileges are dropped.
    python: interpreter that runs the programs (started with `-I`). The default is this
      process's interpreter; when that lies under a directory the program's private tmpfs
      covers (a virtual environment under /tmp), the real interpreter it links to, since
      the tmpfs would hide it (the programs then see the base installation's packages).
  """

  timeout_s: float = 10.0
  memory_mb: int = 1024
  tmp_mb: int | None = None
  cpu_s: float | None = None
  file_size_mb: int = 16
  max_processes: int = 32
  max_open_files: int = 128
  output_limit_bytes: int = 8192
  workers: int | None = None
  queue_size: int | None = None
  drop_privileges: bool | None = None
  sandbox_user: str = "nobody"
  python: str = dataclasses.field(default_factory=lambda: default_python())

  def validate(self) -> "SandboxConfig":
    """Returns self, or raises ValueError naming the first bad field."""
    positive = {
        "timeout_s": self.timeout_s,
        "memory_mb": self.memory_mb,
        "file_size_mb": self.file_size_mb,
        "max_processes": self.max_processes,
        "max_open_files": self.max_open_files,
        "output_limit_bytes": self.output_limit_bytes,
    }
    for name, value in positive.items():
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"SandboxConfig.{name} must be a positive number, got {value!r}")
    for name in ("tmp_mb", "cpu_s", "workers", "queue_size"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not value > 0):
        raise ValueError(f"SandboxConfig.{name} must be None or positive, got {value!r}")
    if self.max_open_files < 16:
      raise ValueError(
          f"SandboxConfig.max_open_files must be at least 16 (the interpreter needs a few), "
          f"got {self.max_open_files}")
    if not self.python or not os.path.exists(self.python):
      raise ValueError(f"SandboxConfig.python: no interpreter at {self.python!r}")
    return self

  @property
  def resolved_workers(self) -> int:
    return int(self.workers) if self.workers else host_cpus()

  @property
  def resolved_queue_size(self) -> int:
    return int(self.queue_size) if self.queue_size else 2 * self.resolved_workers

  @property
  def cpu_limit_s(self) -> int:
    """Whole seconds of CPU time per process (RLIMIT_CPU takes integers)."""
    return max(1, math.ceil(self.cpu_s if self.cpu_s else self.timeout_s + 1))

  @property
  def memory_bytes(self) -> int:
    return int(self.memory_mb) * 1024 * 1024

  @property
  def tmp_bytes(self) -> int:
    return int(self.tmp_mb if self.tmp_mb else self.memory_mb) * 1024 * 1024

  @property
  def file_size_bytes(self) -> int:
    return int(self.file_size_mb) * 1024 * 1024
