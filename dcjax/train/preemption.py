"""Preemption: SIGTERM or SIGINT asks a training loop to save a checkpoint and stop.

The train and GRPO loops check `Preemption.requested` after each step; when it is set they
save, stop, and the process exits with `EXIT_PREEMPTED`, so that a launcher can tell a run to
resume from one that finished or failed. `python -m dcjax.main` exits with

  0    completed (train / grpo: all steps done, final checkpoint saved)
  75   preempted: a checkpoint of the last step was saved; rerun the same command to resume
       (EX_TEMPFAIL of sysexits.h, "temporary failure, retry later")
  1    error: a bad flag or config, or an `error: ...` line / traceback naming the cause
  130  a second Ctrl-C (SIGINT after the first signal): stopped at once, nothing saved
  137  SIGKILL: nothing saved after the last periodic checkpoint

A signal that the process was started with ignored (SIGINT in a job that a script put in the
background with `&`) stays ignored.
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Context manager: while active, SIGTERM / SIGINT set `requested` (the signal's name)."""

  def __init__(self):
    self.requested: str | None = None
    self._previous: dict[int, object] = {}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt  # Ctrl-C after a first signal: stop now, no checkpoint
    self.requested = self.requested or signal.Signals(signum).name

  def __enter__(self):
    for signum in SIGNALS:
      if signal.getsignal(signum) is signal.SIG_IGN:
        continue  # e.g. SIGINT in a job a script started with `&`: it stays ignored
      try:
        self._previous[signum] = signal.signal(signum, self._handler)
      except ValueError:  # not the main thread: no handlers
        break
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      if previous is not None:  # None: a handler installed from C, which cannot be put back
        signal.signal(signum, previous)
    self._previous = {}
