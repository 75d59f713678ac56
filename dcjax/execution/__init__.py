"""Sandboxed local runner for untrusted (model-written) Python programs.

    from dcjax.execution import run_programs
    results = run_programs([code + "\\n" + test for test in tests], timeout_s=5)
    fraction = sum(r.passed for r in results) / len(results)

Each program runs in a fresh `python -I` in its own session (process group) and its own
size-capped /tmp (also its /dev/shm, /var/tmp and working directory), with CPU-time,
address-space, file-size, process-count and open-file limits, a wall-clock timeout after
which the whole group is killed, its stdout/stderr written to size-limited files of which
only the tail comes back, no network, and an environment that holds nothing of the
parent's. Programs run on a thread pool sized to the host with a bounded queue;
`run_programs` returns one `Result` per program and does not raise because of anything a
program does. Temporary files and processes are gone before a Result is returned. `Sandbox(config).isolation.describe()` says what this host
allowed (see dcjax.execution.isolation for the launch chain and its fallbacks).

Threat model: what the sandbox is for, and what it does not stop.

Meant for: code written by a model under training or evaluation: buggy, slow, greedy or
accidentally destructive, and possibly reward-hacking in the ways a policy can stumble
into. Guarantees that hold on Linux with util-linux when run as root (this project's
machines) or where user namespaces are allowed:
  * The trainer survives: the program lives in its own PID namespace (it cannot see or
    signal processes outside it; `os.kill(os.getppid(), 9)` and `os.kill(-1, 9)` reach only
    its own tree) and, when the runner is root, runs as `nobody` with no-new-privs.
  * It ends: wall-clock timeout kills the group, and every process in its PID namespace
    dies with it (even ones that called setsid()).
  * Bounded resources: RLIMIT_AS/CPU/FSIZE/NOFILE per process; RLIMIT_NPROC bounds fork
    bombs once the program is not root (the kernel ignores it for root).
  * Its temporary files are its own (dcjax.execution.private_tmp): /tmp, /dev/shm,
    /var/tmp, /run/lock and the runner's temporary directory are one private tmpfs of
    `tmp_mb` (default: `memory_mb`) in its own mount namespace, so files there count
    against that budget (ENOSPC past it), nobody else sees them (the host's /tmp and the
    trainer's temporary files are hidden from it; its /proc shows only its own processes,
    so no sibling's files either), and the kernel frees them when the program ends,
    however it ends, before its Result is returned. SysV shared memory lives in its own
    IPC namespace and goes the same way.
  * No network: a network namespace with no interface up.
  * "passed" means exit status 0 *and* the program's last line ran: a per-run random token
    is handed over an inherited socket and must be echoed back by two lines the runner
    appends after the program (see dcjax.execution.runner). `os._exit(0)`, `sys.exit(0)`,
    `exit()`, exiting from `atexit` or `sys.excepthook`, and patching `sys.exit`,
    `builtins` or `AssertionError` therefore fail.

Not stopped (known, accepted limits):
  * A program written to defeat this runner can forge the verdict: it can read the
    appended lines from its own file, read the token from the inherited descriptor itself,
    echo it and exit 0. So can any program that makes the tests pass by other means in the
    same interpreter (e.g. a returned object whose `__eq__` is always True, or a
    `sys.settrace` hook). Running tests in the same process as the code cannot prevent
    this; treat pass rates of an adversarially trained policy with that in mind.
  * Reading files: `nobody` can read world-readable files. Where the interpreter lives in
    a directory `nobody` cannot read (a pyenv under /root, as on this project's machines),
    the program keeps CAP_DAC_READ_SEARCH and can read every file in its mount namespace
    (not write): the host's, less what its tmpfs covers.
  * Writing files: `nobody` can still write world-writable places other than the ones
    covered by its tmpfs, up to RLIMIT_FSIZE per file; the runner does not clean those.
    Same-uid setups (a non-root runner, or root where the privilege drop failed) offer no
    file protection at all: the program can delete whatever the runner's user can.
  * Memory while it runs: the tmpfs budget comes on top of RLIMIT_AS, which is per
    process, and neither bounds memfd_create() files (only RLIMIT_FSIZE and
    RLIMIT_NOFILE do) or a tmpfs the program mounts in a user namespace of its own (where
    the kernel allows unprivileged ones). All of it is freed when the program ends;
    bounding it while it runs needs a memory cgroup, which the sandbox does not use.
  * Without a mount namespace (non-Linux, no `mount`, or a container that forbids it):
    no private tmpfs. The working directory (also HOME and TMPDIR) is a private
    directory on the host that a watchdog measures every 0.1 s, killing the program once
    it holds more than `tmp_mb` there (it can write more than that within one interval);
    absolute paths such as /tmp/x or /dev/shm/x are neither capped, private nor cleaned,
    and the host's /tmp is visible. `isolation.describe()` says which case holds.
  * Concurrent programs share the `nobody` uid and its process budget: a fork bomb can
    make a neighbour's fork() fail (never pass it).
  * Without namespaces (non-Linux, or no unshare): only a guard audit hook blocks sockets
    (ctypes gets around it), processes that call setsid() escape the group kill, and a
    program running as the runner's own uid (a non-root runner, or root where the drop
    failed) can kill the trainer: the kernel always lets a uid signal its own processes.
    Only the privilege drop (or the PID namespace) prevents that.
  * Inside the PID namespace the program is PID 1, so signals it sends itself without a
    handler installed are ignored (e.g. `os.kill(os.getpid(), SIGTERM)` does nothing).
"""

from dcjax.execution.config import SandboxConfig
from dcjax.execution.isolation import Isolation, detect_isolation
from dcjax.execution.pool import Sandbox, run_programs
from dcjax.execution.result import STATUSES, Result, Status

__all__ = ["Isolation", "Result", "STATUSES", "Sandbox", "SandboxConfig", "Status",
           "detect_isolation", "run_programs"]
