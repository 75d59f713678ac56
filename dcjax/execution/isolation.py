"""Which isolation this host allows, found once per process by trying it.

On Linux with util-linux (`unshare`, `prlimit`, `setpriv`, `mount`) a program is started as

  unshare --mount --propagation=private --ipc --net --pid --fork --kill-child --mount-proc
                                              # own mount, IPC, network (no interfaces up)
                                              # and PID namespaces, and its own /proc
    sh -c 'mount --fstab FSTAB -a && ...'     # its own size-capped /tmp, /dev/shm, ...
                                              # (dcjax.execution.private_tmp)
      prlimit --cpu --as --fsize --nproc --nofile --core --   # resource limits
        setpriv --reuid --regid --clear-groups --no-new-privs # when root: become `nobody`
          python -I /dev/fd/N

All of these are small C programs (and one shell) that exec each other, so the runner
never forks the (possibly huge) trainer with Python code running in the child (no
`preexec_fn`), and `subprocess` can use vfork. As a non-root user the namespaces come from
a user namespace where the kernel allows one: `unshare --user --map-root-user ...` so that
the shell may mount, then `unshare --map-user=UID --map-group=GID` in a nested user
namespace, so that the program runs as the runner's uid again, without capabilities.

Each tier is probed with a real interpreter start, best first; the first that works is
kept and what failed is noted: without a mount namespace (or where it cannot mount) there
is no private /tmp, only a private working directory with a size watchdog; without
namespaces at all, no PID or network namespace either. Without `prlimit` the limits are
set by a first line the runner adds to the program, and without a network namespace that
line also installs an audit hook that refuses sockets other than AF_UNIX (a guard, not a
wall: ctypes can get around it).

When the interpreter lives where `nobody` cannot read it (e.g. a pyenv under /root), a
plain privilege drop starts the interpreter with the wrong standard library; the probe
sees that and keeps one capability, CAP_DAC_READ_SEARCH, in the ambient set: the program
can then read (not write) every file in its mount namespace, but still cannot signal other
users' processes, write outside its own temporary directories and world-writable places,
or fork past its process limit. An interpreter under /tmp (e.g. a virtual environment made
there) is hidden by the private /tmp: the probe then falls back to the tier without it.
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
import tempfile

from dcjax.execution import private_tmp

_LOG = logging.getLogger("dcjax.execution")

_PROBE = """\
import json, os, sys
report = {'uid': os.getuid(), 'pid': os.getpid(), 'stdlib': os.path.dirname(os.__file__),
          'version': sys.version}
try:  # what the private-tmpfs tiers are checked by; argv: the directories it covers
  t = os.statvfs('/tmp')
  report.update(tmp_bytes=t.f_blocks * t.f_frsize, tmp_entries=len(os.listdir('/tmp')),
                tmp_devs=len({os.stat(d).st_dev for d in sys.argv[1:]}),
                procs=sum(e.isdigit() for e in os.listdir('/proc')))
except OSError:
  pass
print(json.dumps(report))
"""
# Size of the tmpfs the probe mounts: how it recognises its own.
_PROBE_TMP_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Isolation:
  """How programs are started on this host.

  Attributes:
    namespaces: argv prefix that enters fresh namespaces (empty: none).
    mount_stage: argv that mounts the program's private tmpfs from the mount table given
      as its next argument (empty: no private tmpfs; see dcjax.execution.private_tmp).
    user_stage: argv run after the mount stage (the nested user namespace of a non-root
      runner; empty otherwise).
    private_tmp: the directories the program's tmpfs covers, its working directory first
      (empty: it uses a private directory on the host and sees the host's /tmp).
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
  mount_stage: tuple[str, ...] = ()
  user_stage: tuple[str, ...] = ()
  private_tmp: tuple[str, ...] = ()
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

  def launcher(self, fstab_path: str) -> list[str]:
    """Everything before the limits and the privilege drop, given the program's mount table."""
    if not self.mount_stage:
      return list(self.namespaces)
    return [*self.namespaces, *self.mount_stage, fstab_path, *self.user_stage]

  def describe(self) -> str:
    user = f"uid {self.uid}" + (" (+CAP_DAC_READ_SEARCH)" if self.reads_all_files else "")
    tmp = ("private tmpfs on " + ",".join(self.private_tmp) if self.private_tmp
           else "host /tmp, private TMPDIR with a size watchdog")
    return (f"network={self.network}, pid_namespace={self.pid_namespace}, tmp={tmp}, "
            f"limits={'prlimit' if self.prlimit else 'in-program'}, runs as {user}")


def _run_probe(argv: list[str], python: str, dirs: tuple[str, ...] = ()) -> dict | None:
  """Starts `python -I -c PROBE dirs...` behind `argv`; returns its report or None."""
  try:
    out = subprocess.run(
        argv + [python, "-I", "-c", _PROBE, *dirs], stdin=subprocess.DEVNULL,
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


def _namespace_tiers(euid: int, egid: int) -> list[tuple[str, list[str], tuple, tuple]]:
  """(name, unshare flags, mount stage, user stage) to try, best first."""
  unshare, mount = shutil.which("unshare"), shutil.which("mount")
  shell = shutil.which("sh") or "/bin/sh"
  base = ["--net", "--pid", "--fork", "--kill-child"]
  full = ["--mount", "--propagation=private", "--ipc", *base, "--mount-proc"]
  stage = private_tmp.mount_stage(shell, mount) if mount else ()
  nested = (unshare, f"--map-user={euid}", f"--map-group={egid}")
  tiers = []
  if euid == 0:
    if stage:
      tiers.append(("root, private tmpfs", [unshare, *full], stage, ()))
    tiers.append(("root", [unshare, *base], (), ()))
  if stage:
    tiers.append(("user namespace, private tmpfs",
                  [unshare, "--user", "--map-root-user", *full], stage, nested))
  tiers.append(("user namespace", [unshare, "--user", "--map-current-user", *base], (), ()))
  return tiers


@functools.lru_cache(maxsize=None)
def detect_isolation(python: str, drop_privileges: bool | None = None,
                     sandbox_user: str = "nobody") -> Isolation:
  """Probes this host once per (python, drop_privileges, sandbox_user)."""
  reference = _run_probe([], python)
  if reference is None:
    raise RuntimeError(f"dcjax.execution: cannot start the interpreter {python!r} with -I")
  fd, fstab_path = tempfile.mkstemp(prefix="dcjax-sandbox-probe-", suffix=".fstab")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(private_tmp.fstab(private_tmp.covered_dirs(), _PROBE_TMP_BYTES))
    os.chmod(fstab_path, 0o644)
    return _detect(python, drop_privileges, sandbox_user, reference["stdlib"], fstab_path)
  finally:
    os.remove(fstab_path)


def _detect(python: str, drop_privileges: bool | None, sandbox_user: str, stdlib: str,
            fstab_path: str) -> Isolation:
  """detect_isolation, given the probe's mount table and the interpreter's stdlib path."""
  notes: list[str] = []
  euid = os.geteuid()
  dirs = private_tmp.covered_dirs()
  found: dict = {}  # the Isolation fields of the first namespace tier that works
  prlimit = None
  if sys.platform.startswith("linux"):
    prlimit = shutil.which("prlimit")
    if shutil.which("unshare") is None:
      notes.append("no unshare binary")
    else:
      if shutil.which("mount") is None:
        notes.append("no mount binary: no private /tmp")
      for name, argv, stage, user_stage in _namespace_tiers(euid, os.getegid()):
        fields = dict(namespaces=tuple(argv), mount_stage=stage, user_stage=user_stage)
        report = _run_probe(Isolation(**fields).launcher(fstab_path), python, dirs)
        ok = report is not None and report["pid"] == 1
        if ok and stage:  # the tmpfs is there, empty, the only /proc entry is the program
          ok = (report.get("tmp_bytes") == _PROBE_TMP_BYTES and report["tmp_entries"] == 0
                and report["tmp_devs"] == 1 and report["procs"] == 1)
        if ok:
          found = dict(fields, private_tmp=dirs if stage else ())
          break
        notes.append(f"namespace tier '{name}' failed")
  launcher = Isolation(**found).launcher(fstab_path)
  if prlimit and _run_probe([*launcher, prlimit, "--nofile=64:64", "--"], python) is None:
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
        report = _run_probe([*launcher, *argv], python)
        if report is not None and report["uid"] == target_uid and report["stdlib"] == stdlib:
          drop, uid, gid, reads_all = argv, target_uid, target_gid, reads
          break
      else:
        notes.append(f"could not start {python} as uid {target_uid}: programs run as root")
  namespaced = bool(found.get("namespaces"))
  iso = Isolation(**found, prlimit=prlimit, drop=drop,
                  network="namespace" if namespaced else "guard", pid_namespace=namespaced,
                  uid=uid, gid=gid, reads_all_files=reads_all, notes=tuple(notes))
  if uid == 0 or not iso.private_tmp:
    _LOG.warning("dcjax.execution sandbox is weaker on this host: %s (%s)", iso.describe(),
                 "; ".join(notes) or "no namespaces")
  else:
    _LOG.info("dcjax.execution sandbox: %s", iso.describe())
  return iso
