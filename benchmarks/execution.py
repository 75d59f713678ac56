"""Sandbox throughput and overhead on the HumanEval canonical solutions.

  python benchmarks/execution.py [--workers N] [--overhead-runs 40]

1. Programs per second over the 164 HumanEval canonical programs (solution + tests): the
   pool (one worker per CPU by default) against one program at a time, and their ratio.
2. Per-program sandbox overhead: the mean wall time of a `pass` program in a one-worker
   sandbox (temp dir, namespaces, limits, privilege drop, verdict, cleanup) minus that of
   a bare `subprocess.run([python, "-I", "-c", "pass"])`, both one after another.

Ends with one line of JSON holding the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcjax.eval.tasks import load_humaneval  # noqa: E402
from dcjax.execution import Sandbox, SandboxConfig  # noqa: E402
from dcjax.execution.config import host_cpus  # noqa: E402


def throughput(programs: list[str], workers: int) -> tuple[float, int]:
  sandbox = Sandbox(SandboxConfig(timeout_s=10, workers=workers))
  sandbox.isolation  # probe outside the timing
  start = time.perf_counter()
  results = sandbox.run_many(programs)
  elapsed = time.perf_counter() - start
  return len(programs) / elapsed, sum(r.passed for r in results)


def mean_wall(fn, runs: int) -> float:
  fn()  # warm up
  start = time.perf_counter()
  for _ in range(runs):
    fn()
  return (time.perf_counter() - start) / runs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workers", type=int, default=host_cpus())
  parser.add_argument("--overhead-runs", type=int, default=40)
  args = parser.parse_args()

  tasks = load_humaneval()
  programs = [t.program(t.canonical_solution) for t in tasks]
  serial_pps, serial_ok = throughput(programs, 1)
  pool_pps, pool_ok = throughput(programs, args.workers)

  sandbox = Sandbox(SandboxConfig(timeout_s=10, workers=1))
  python = sandbox.config.python
  n = args.overhead_runs
  bare_s = mean_wall(lambda: subprocess.run([python, "-I", "-c", "pass"], check=True), n)
  sandbox_s = mean_wall(lambda: sandbox.run_many(["pass"] * n), 1) / n

  figures = {
      "programs": len(programs), "workers": args.workers, "host_cpus": host_cpus(),
      "passed_serial": serial_ok, "passed_pool": pool_ok,
      "serial_programs_per_s": round(serial_pps, 2), "pool_programs_per_s": round(pool_pps, 2),
      "pool_over_serial": round(pool_pps / serial_pps, 2),
      "bare_python_ms": round(1000 * bare_s, 2), "sandbox_pass_ms": round(1000 * sandbox_s, 2),
      "sandbox_overhead_ms": round(1000 * (sandbox_s - bare_s), 2),
      "sandbox_over_bare": round(sandbox_s / bare_s, 2),
      "isolation": sandbox.isolation.describe(),
  }
  print(f"HumanEval canonical, {len(programs)} programs: {serial_pps:.1f}/s one at a time, "
        f"{pool_pps:.1f}/s on {args.workers} workers ({pool_pps / serial_pps:.2f}x)")
  print(f"python -I -c pass: {1000 * bare_s:.1f} ms; in the sandbox: {1000 * sandbox_s:.1f} ms "
        f"(+{1000 * (sandbox_s - bare_s):.1f} ms per program)")
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
