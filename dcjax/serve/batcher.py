"""The request queue: jobs with equal batch keys (their sampler options; for infilling also
the canvas bucket and mask count, `Engine.batch_key`) that arrive within a short window are
sampled together in one fixed-shape batch (docs/serving.md).

One worker thread owns the `Engine`. It takes the oldest job, then waits at most
`window_s` for more jobs with the same key until `engine.batch_size` rows are gathered;
jobs with other keys wait (in arrival order) for a later batch. A job larger than a batch
runs alone, in several batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any, Sequence

from dcjax.serve.engine import Completion, Engine, Options


@dataclasses.dataclass
class Job:
  rows: Sequence[Sequence[int]]
  options: Options
  key: Any = None  # jobs with equal keys share batches; None: the options
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)


class Batcher:
  """`submit(rows, options, key=...)` -> a Future of the rows' completions."""

  def __init__(self, engine: Engine, window_s: float):
    self.engine, self.window_s = engine, window_s
    self.batch_sizes: list[int] = []  # jobs per engine call, for the stats
    self._queue: queue.Queue[Job] = queue.Queue()
    self._waiting: collections.deque[Job] = collections.deque()  # taken, other options
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="dcjax-batcher", daemon=True)
    self._thread.start()

  def submit(self, rows: Sequence[Sequence[int]], options: Options, key: Any = None
             ) -> concurrent.futures.Future:
    """`key`: rows with equal keys may share a batch (`Engine.batch_key`); default the
    options."""
    if self._stop.is_set():
      raise RuntimeError("the batcher is stopped")
    job = Job(rows, options, options if key is None else key)
    self._queue.put(job)
    return job.future

  def stop(self, timeout: float = 60.0) -> None:
    self._stop.set()
    self._thread.join(timeout)

  def _take(self, timeout: float) -> Job | None:
    if self._waiting:
      return self._waiting.popleft()
    try:
      return self._queue.get(timeout=timeout)
    except queue.Empty:
      return None

  def _gather(self, first: Job) -> list[Job]:
    """`first` and the jobs with its key that fit in its batch, waiting <= window_s."""
    jobs, rows = [first], len(first.rows)
    limit = self.engine.batch_size
    for job in list(self._waiting):  # earlier arrivals first
      if job.key == first.key and rows + len(job.rows) <= limit:
        self._waiting.remove(job)
        jobs.append(job)
        rows += len(job.rows)
    deadline = time.monotonic() + self.window_s
    while rows < limit:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      try:
        job = self._queue.get(timeout=remaining)
      except queue.Empty:
        break
      if job.key == first.key and rows + len(job.rows) <= limit:
        jobs.append(job)
        rows += len(job.rows)
      else:
        self._waiting.append(job)
    return jobs

  def _loop(self) -> None:
    while not self._stop.is_set():
      first = self._take(timeout=0.05)
      if first is None:
        continue
      jobs = [j for j in self._gather(first) if j.future.set_running_or_notify_cancel()]
      if not jobs:
        continue
      rows = [r for j in jobs for r in j.rows]
      try:
        completions: list[Completion] = self.engine.run(rows, first.options)
      except Exception as e:  # pylint: disable=broad-except
        for j in jobs:
          j.future.set_exception(e)
        continue
      self.batch_sizes.append(len(jobs))
      start = 0
      for j in jobs:
        j.future.set_result(completions[start:start + len(j.rows)])
        start += len(j.rows)
    for job in list(self._waiting) + _drain(self._queue):  # stopped: fail what is left
      if job.future.set_running_or_notify_cancel():
        job.future.set_exception(RuntimeError("the server is shutting down"))


def _drain(q: queue.Queue) -> list[Job]:
  jobs = []
  while True:
    try:
      jobs.append(q.get_nowait())
    except queue.Empty:
      return jobs
