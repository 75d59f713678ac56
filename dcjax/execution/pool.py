"""Runs many programs at once on a worker pool with a bounded queue: the public API."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Iterable, Iterator, Sequence

from dcjax.execution.config import SandboxConfig
from dcjax.execution.isolation import Isolation, detect_isolation
from dcjax.execution.result import Result
from dcjax.execution.runner import run_program

_LOG = logging.getLogger("dcjax.execution")


def _tasks_of_uid(uid: int) -> int:
  """Processes and threads `uid` runs now (what RLIMIT_NPROC counts); 0 where unknown."""
  total = 0
  try:
    entries = os.listdir("/proc")
  except OSError:
    return 0
  for entry in entries:
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status", "rb") as f:
        status = f.read()
    except OSError:
      continue
    uid_line = status.split(b"\nUid:", 1)[-1].split(None, 1)
    if uid_line and uid_line[0] == str(uid).encode():
      threads = status.split(b"\nThreads:", 1)[-1].split(None, 1)
      total += int(threads[0]) if threads and threads[0].isdigit() else 1
  return total


class _Abort:
  """Wakes every waiting worker at once (a pipe that becomes readable) when set."""

  def __init__(self):
    self.event = threading.Event()
    self.read_fd, self._write_fd = os.pipe()

  def set(self) -> None:
    if not self.event.is_set():
      self.event.set()
      os.write(self._write_fd, b"x")

  def close(self) -> None:
    os.close(self.read_fd)
    os.close(self._write_fd)


class Sandbox:
  """A configured runner. `map` streams results in input order with at most
  `config.resolved_queue_size` programs submitted ahead of the consumer.

  Example:
    sandbox = Sandbox(SandboxConfig(timeout_s=5))
    results = sandbox.run_many(["assert 1 + 1 == 2", "assert False"])
    [r.status for r in results]  # ['passed', 'failed']
  """

  def __init__(self, config: SandboxConfig | None = None, *,
               isolation: Isolation | None = None, **overrides):
    """`overrides` replace fields of `config`; `isolation` skips the host probe (tests)."""
    config = dataclasses.replace(config or SandboxConfig(), **overrides)
    self.config = config.validate()
    self._isolation = isolation

  @property
  def isolation(self) -> Isolation:
    """How programs are isolated on this host (probed on first use, then cached)."""
    if self._isolation is None:
      cfg = self.config
      self._isolation = detect_isolation(cfg.python, cfg.drop_privileges, cfg.sandbox_user)
    return self._isolation

  def _nproc(self) -> int:
    """RLIMIT_NPROC counts every task of the program's user: leave room for what that user
    already runs and for the other workers' programs."""
    iso = self.isolation
    running = _tasks_of_uid(iso.uid) if iso.limits_processes else 0
    return running + self.config.resolved_workers + int(self.config.max_processes)

  def _run_safe(self, source: str, nproc: int, abort: _Abort | None) -> Result:
    start = time.monotonic()
    try:
      return run_program(source, self.config, self.isolation, nproc=nproc,
                         abort_fd=abort.read_fd if abort else None,
                         abort=abort.event if abort else None)
    except Exception as e:  # a runner bug must not reach the trainer
      _LOG.exception("dcjax.execution: internal error while running a program")
      return Result("crashed", None, "", "", time.monotonic() - start,
                    f"internal sandbox error: {type(e).__name__}: {e}")

  def run(self, source: str) -> Result:
    """Runs one program in the calling thread."""
    _check_source(source, 0)
    return self._run_safe(source, self._nproc(), None)

  def map(self, sources: Iterable[str]) -> Iterator[Result]:
    """Runs programs on `config.resolved_workers` threads; yields Results in input order.

    Closing the iterator early (or an exception in the consumer) kills the programs still
    running and drops the queued ones.
    """
    workers, window = self.config.resolved_workers, self.config.resolved_queue_size
    nproc = self._nproc()
    abort = _Abort()
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    executor = concurrent.futures.ThreadPoolExecutor(workers, "dcjax-sandbox")
    try:
      for i, source in enumerate(sources):
        _check_source(source, i)
        pending.append(executor.submit(self._run_safe, source, nproc, abort))
        if len(pending) >= window:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      if pending:
        abort.set()
        for future in pending:
          future.cancel()
      executor.shutdown(wait=True)
      abort.close()

  def run_many(self, sources: Iterable[str]) -> list[Result]:
    """Runs all programs in parallel; one Result per source, in order."""
    return list(self.map(sources))


def _check_source(source, index: int) -> None:
  if not isinstance(source, str):
    raise TypeError(f"program #{index} must be a str of Python source, got "
                    f"{type(source).__name__}")


def run_programs(sources: Sequence[str], timeout_s: float | None = None,
                 memory_mb: int | None = None, *, workers: int | None = None,
                 config: SandboxConfig | None = None) -> list[Result]:
  """Runs each source as its own sandboxed program, in parallel; returns one Result each.

  Arguments left as None come from `config` (default: SandboxConfig()). Never raises
  because of what a program did; raises TypeError for a source that is not a str and
  ValueError for a bad setting.
  """
  overrides = {k: v for k, v in
               (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("workers", workers))
               if v is not None}
  return Sandbox(config, **overrides).run_many(sources)
