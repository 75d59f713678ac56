"""Which isolation this host allows, found once per process by trying it.

On Linux with util-linux (`unshare`, `prlimit`, `setpriv`) a program is started as

  unshare --net --pid --fork --kill-child     # own network namespace (no interfaces up)
                                              # and PID namespace (sees only its own tree)
    prlimit --cpu --as --fsize --nproc --nofile --core --   # resource limits
      setpriv --reuid --regid --clear-groups --no-new-privs # when root: become `nobody`
        python -I main.py

All of these are small C programs that exec each other, so the runner never forks the
(possibly huge) trainer with Python code running in the child (no `preexec_fn`), and
`subprocess` can use vfork. As a non-root user the namespaces come from a user namespace
(`unshare --user --map-current-user`) where the kernel allows one.

Each piece is probed with a real interpreter start; whatever fails is dropped and noted:
without `prlimit` the limits are set by a first line the runner adds to the program, and
without a network namespace that line also installs an audit hook that refuses sockets
other than AF_UNIX (a guard, not a wall: ctypes can get around it).

When the interpreter lives where `nobody` cannot read it (e.g. a pyenv under /root), a
plain privilege drop starts the interpreter with the wrong standard library; the probe
sees that and keeps one capability, CAP_DAC_READ_SEARCH, in the ambient set: the program
can then read (not write) every file, but still cannot signal other users' processes,
write outside world-writable places, or fork past its process limit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pwd
import shutil
import subprocess
import sys

_LOG = logging.getLogger("dcjax.execution")

_PROBE = (
    "import json, os, sys; print(json.dumps({'uid': os.getuid(), 'pid': os.getpid(), "
    "'stdlib': os.path.dirname(os.__file__), 'version': sys.version}))")


@dataclasses.dataclass(frozen=True)
class Isolation:
  """How programs are started on this host.

  Attributes:
    namespaces: argv prefix that enters fresh namespaces (empty: none).
    prlimit: path of `prlimit`, or None when limits come from a first line in the program.
    drop: argv prefix that drops privileges (empty: programs keep the runner's uid).
    network: "namespace" (no network interfaces) or "guard" (audit hook in the program).
    pid_namespace: the program sees only its own processes and all of them die with it.
    uid: the uid programs run as.
    gid: their gid.
    reads_all_files: the dropped uid keeps CAP_DAC_READ_SEARCH (see the module docstring).
    notes: what the probe found, for logs.
  """

  namespaces: tuple[str, ...] = ()
  prlimit: str | None = None
  drop: tuple[str, ...] = ()
  network: str = "guard"
  pid_namespace: bool = False
  uid: int = dataclasses.field(default_factory=os.geteuid)
  gid: int = dataclasses.field(default_factory=os.getegid)
  reads_all_files: bool = False
  notes: tuple[str, ...] = ()

  @property
  def limits_processes(self) -> bool:
    """Whether RLIMIT_NPROC binds: the kernel ignores it for root."""
    return self.uid != 0

  @property
  def needs_prologue(self) -> bool:
    return self.prlimit is None or self.network != "namespace"

  def describe(self) -> str:
    user = f"uid {self.uid}" + (" (+CAP_DAC_READ_SEARCH)" if self.reads_all_files else "")
    return (f"network={self.network}, pid_namespace={self.pid_namespace}, "
            f"limits={'prlimit' if self.prlimit else 'in-program'}, runs as {user}")


def _run_probe(argv: list[str], python: str) -> dict | None:
  """Starts `python -I -c PROBE` behind `argv`; returns its report or None."""
  try:
    out = subprocess.run(
        argv + [python, "-I", "-c", _PROBE], stdin=subprocess.DEVNULL,
        capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/")
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  try:
    return json.loads(out.stdout.decode().strip().splitlines()[-1])
  except (ValueError, IndexError):
    return None


def _resolve_user(user: str) -> tuple[int, int]:
  try:
    entry = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid
  except (KeyError, ValueError):
    if str(user).isdigit():
      return int(user), int(user)
    raise ValueError(f"SandboxConfig.sandbox_user: no user named {user!r} on this host") from None


@functools.lru_cache(maxsize=None)
def detect_isolation(python: str, drop_privileges: bool | None = None,
                     sandbox_user: str = "nobody") -> Isolation:
  """Probes this host once per (python, drop_privileges, sandbox_user)."""
  notes: list[str] = []
  euid = os.geteuid()
  reference = _run_probe([], python)
  if reference is None:
    raise RuntimeError(f"dcjax.execution: cannot start the interpreter {python!r} with -I")

  namespaces: tuple[str, ...] = ()
  prlimit = None
  if sys.platform.startswith("linux"):
    unshare, prlimit = shutil.which("unshare"), shutil.which("prlimit")
    if unshare:
      flags = ["--net", "--pid", "--fork", "--kill-child"]
      tries = [[unshare, *flags]] if euid == 0 else []
      tries.append([unshare, "--user", "--map-current-user", *flags])
      for argv in tries:
        report = _run_probe(argv, python)
        if report is not None and report["pid"] == 1:
          namespaces = tuple(argv)
          break
      else:
        notes.append("unshare could not create network/PID namespaces")
    else:
      notes.append("no unshare binary")
    if prlimit and _run_probe([*namespaces, prlimit, "--nofile=64:64", "--"], python) is None:
      notes.append("prlimit failed; limits set inside the program")
      prlimit = None

  drop: tuple[str, ...] = ()
  uid, gid, reads_all = euid, os.getegid(), False
  if drop_privileges is None:
    drop_privileges = euid == 0
  if drop_privileges:
    if euid != 0:
      raise ValueError("SandboxConfig.drop_privileges=True needs the runner to be root")
    target_uid, target_gid = _resolve_user(sandbox_user)
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
      notes.append("no setpriv binary: programs run as root")
    else:
      plain = (setpriv, f"--reuid={target_uid}", f"--regid={target_gid}", "--clear-groups",
               "--no-new-privs")
      cap = "dac_read_search"
      with_cap = plain + (f"--inh-caps=-all,+{cap}", f"--ambient-caps=-all,+{cap}",
                          f"--bounding-set=-all,+{cap}")
      for argv, reads in ((plain, False), (with_cap, True)):
        report = _run_probe([*namespaces, *argv], python)
        if (report is not None and report["uid"] == target_uid
            and report["stdlib"] == reference["stdlib"]):
          drop, uid, gid, reads_all = argv, target_uid, target_gid, reads
          break
      else:
        notes.append(f"could not start {python} as uid {target_uid}: programs run as root")
  iso = Isolation(namespaces=namespaces, prlimit=prlimit, drop=drop,
                  network="namespace" if namespaces else "guard",
                  pid_namespace=bool(namespaces), uid=uid, gid=gid, reads_all_files=reads_all,
                  notes=tuple(notes))
  if uid == 0 or not namespaces:
    _LOG.warning("dcjax.execution sandbox is weaker on this host: %s (%s)", iso.describe(),
                 "; ".join(notes) or "no namespaces")
  else:
    _LOG.info("dcjax.execution sandbox: %s", iso.describe())
  return iso
