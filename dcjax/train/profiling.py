"""`config.profile_steps = "START,END"`: a jax.profiler trace of steps [START, END).

The train loop calls `before(step)` before dispatching step `step` (0-based: the state's step
counter) and the GRPO loop before iteration `step`; the trace starts before step START and
stops, after the device has finished, before step END (or when the loop ends first). It is
written by process 0 to `<workdir>/profile/` (the local mirror of a gs:// workdir, pushed with
the other host files); open it with TensorBoard's profile plugin or xprof.
"""

from __future__ import annotations

import os
from typing import Callable

import jax

from dcjax import config as config_lib


class Profiler:

  def __init__(self, config, directory: str, log: Callable[[str], None] = print):
    self.window = config_lib.profile_window(config)
    self.directory, self.log = directory, log
    self.active = False
    self.enabled = self.window is not None and jax.process_index() == 0

  def before(self, step: int, wait_for=None) -> None:
    """Starts or stops the trace at the window's edges; `wait_for` (a pytree of arrays) is
    blocked on before stopping, so the trace holds the last step's device work."""
    if not self.enabled:
      return
    start, end = self.window
    if step == start and not self.active:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True
      self.log(f"profiler: tracing steps [{start}, {end}) to {self.directory}")
    elif step == end and self.active:
      self.stop(wait_for)

  def stop(self, wait_for=None) -> None:
    if not self.active:
      return
    if wait_for is not None:
      jax.block_until_ready(wait_for)
    jax.profiler.stop_trace()
    self.active = False
    self.log(f"profiler: trace written to {self.directory}")
