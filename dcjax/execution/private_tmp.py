"""Each program's own temporary directories: one size-capped tmpfs in its mount namespace.

Where the host allows a mount namespace (see dcjax.execution.isolation), a shell runs as
root inside it, before the limits and the privilege drop, and mounts one tmpfs of
`SandboxConfig.tmp_bytes` on /tmp, then binds that same directory over /dev/shm, /var/tmp,
/run/lock and the runner's own temporary directory, where those exist:

  sh -c 'mount --fstab "$0" -a && cd /tmp && exec "$@"' FSTAB prlimit ... python -I /dev/fd/N

So:
  * Everything the program writes to any of them, and to its working directory (/tmp),
    shares one budget, on top of its address-space limit; a full budget is ENOSPC, as on
    a full disk. Inodes are capped too (`inode_limit`), since they cost kernel memory.
  * The mounts have private propagation: the host and the other programs never see them,
    and the program sees none of the host's /tmp (nor the trainer's temporary files).
  * The tmpfs lives exactly as long as the namespace: when the last process of the
    program exits, however it ends, the kernel unmounts it and frees its pages before the
    runner can reap the launcher. There is nothing to clean up.
  * The program cannot unmount it to reach the host's /tmp: it holds no capabilities, and
    in a user namespace of its own the kernel keeps inherited mounts locked together.
  * Its /proc is its own (`unshare --mount-proc`), so it cannot reach a sibling program's
    files through /proc/PID/root or /proc/PID/cwd either.

Because the runner's temporary directory (main.py, the output files) is hidden too, the
interpreter reads the program from an inherited descriptor (/dev/fd/N): tracebacks name
"/dev/fd/N" instead of "main.py". (multiprocessing's "spawn" and "forkserver" start
methods, which re-read the main file in a fresh interpreter, do not work in the sandbox;
"fork", the default on Linux, does.)

Without a mount namespace the runner falls back to a private working directory (also
TMPDIR and HOME) on the host, whose size a watchdog in dcjax.execution.runner checks every
`WATCH_INTERVAL_S`; absolute paths such as /tmp/x or /dev/shm/x are then neither capped,
private nor cleaned (see dcjax.execution for the threat model).
"""

from __future__ import annotations

import os
import shlex
import tempfile

# The program's working directory, HOME and TMPDIR when it has a private tmpfs.
ROOT = "/tmp"
# World-writable places that get the same tmpfs bound over them, where they exist.
_ALSO = ("/dev/shm", "/var/tmp", "/run/lock")
# How often the fallback watchdog measures a program's working directory.
WATCH_INTERVAL_S = 0.1


def covered_dirs() -> tuple[str, ...]:
  """The directories a program's tmpfs covers on this host, ROOT first.

  The runner's temporary directory is added unless it lies under one already covered.
  """
  dirs = [ROOT]
  for path in (*_ALSO, tempfile.gettempdir()):
    real = os.path.realpath(path)
    inside = any(real == d or real.startswith(d.rstrip("/") + "/") for d in dirs)
    if os.path.isdir(real) and not inside:
      dirs.append(real)
  return tuple(dirs)


def inode_limit(size_bytes: int) -> int:
  """Files and directories a tmpfs of `size_bytes` may hold: one per 64 KiB, at least 1024."""
  return max(1024, size_bytes // (64 * 1024))


def _field(path: str) -> str:
  """A path as an fstab field: whitespace and backslashes octal-escaped."""
  return "".join(f"\\{ord(c):03o}" if c.isspace() or c == "\\" else c for c in path)


def fstab(dirs: tuple[str, ...], size_bytes: int) -> str:
  """The mount table that gives a program its tmpfs on dirs[0], bound over the rest."""
  options = f"size={size_bytes},nr_inodes={inode_limit(size_bytes)},mode=1777,nosuid,nodev"
  root = _field(dirs[0])
  lines = [f"dcjax-sandbox {root} tmpfs {options} 0 0"]
  lines += [f"{root} {_field(d)} none bind,nosuid,nodev 0 0" for d in dirs[1:]]
  return "\n".join(lines) + "\n"


def mount_stage(shell: str, mount: str) -> tuple[str, ...]:
  """The argv that mounts the table given as its next argument, then execs the rest."""
  script = f'{shlex.quote(mount)} --fstab "$0" -a && cd {ROOT} && exec "$@"'
  return (shell, "-c", script)


def tree_bytes(path: str) -> int:
  """Bytes allocated under `path` (not following symlinks); what the watchdog measures."""
  total = 0
  for parent, dirnames, filenames in os.walk(path):
    for name in dirnames + filenames:
      try:
        total += os.lstat(os.path.join(parent, name)).st_blocks * 512
      except OSError:
        pass
  return total
