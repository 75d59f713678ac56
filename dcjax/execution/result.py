"""The structured outcome of running one untrusted program."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Status = Literal["passed", "failed", "timeout", "crashed"]
STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "crashed")


@dataclasses.dataclass(frozen=True)
class Result:
  """What happened to one program.

  Attributes:
    status: "passed" (exit status 0 *and* its last line ran, see dcjax.execution),
      "failed" (an exception, a non-zero exit, or an early exit), "timeout" (wall-clock or
      CPU-time limit) or "crashed" (killed by a signal, or the sandbox could not run it).
    returncode: exit status as `subprocess` reports it (negative: killed by that signal);
      None when the program never started.
    stdout: the last `output_limit_bytes` of its standard output (decoded, lossy).
    stderr: the same for standard error.
    duration_s: wall-clock seconds from start to reaped, sandbox set-up included.
    detail: one line saying why the status is what it is.
  """

  status: Status
  returncode: int | None
  stdout: str
  stderr: str
  duration_s: float
  detail: str = ""

  @property
  def passed(self) -> bool:
    return self.status == "passed"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
