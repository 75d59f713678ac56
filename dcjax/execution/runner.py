"""Runs one untrusted program start to finish: temp dir, launch, wait, kill, verdict, cleanup.

The runner's temporary directory holds the program (main.py), its stdout and stderr and,
where the program gets a private tmpfs (dcjax.execution.private_tmp), the mount table of
that tmpfs; the program then starts in its tmpfs and never sees this directory. Without
one, the program works in a subdirectory `work` here (also its HOME and TMPDIR), and a
watchdog kills it once it holds more than `SandboxConfig.tmp_mb` there.

The verdict "passed" needs two things: exit status 0 and proof that the program's last
line ran. The proof: before the launch the runner puts a fresh random token into one end
of a socket pair and hands the other end to the child as an inherited descriptor; the
runner appends two lines after the program that read the token from that descriptor and
write it back. The token is never on disk, in the program text, in the environment or in
the child's memory before those lines run, so `os._exit(0)`, `sys.exit(0)`, an `atexit`
or `sys.excepthook` that exits 0, or a patched `AssertionError` / `builtins` all end
without the token and read as "failed". See dcjax.execution for what this does not stop.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time

from dcjax.execution import private_tmp
from dcjax.execution.config import SandboxConfig
from dcjax.execution.isolation import Isolation
from dcjax.execution.result import Result

_EPILOGUE = ("\n\n# dcjax sandbox: the two lines below tell the runner this program reached "
             "its end.\nimport os as _dcjax_os\n_dcjax_os.write({fd}, _dcjax_os.read({fd}, 64))\n")

# What util-linux's unshare prints when its child was killed; not the program's output.
_WRAPPER_NOISE = "unshare: sigprocmask unblock failed: Invalid argument\n"

# Audit hook installed when there is no network namespace: refuses name resolution and
# every socket address that is not an AF_UNIX path.
_NET_GUARD = (
    "import sys\n"
    "def guard(event, args):\n"
    "  if event.startswith(('socket.getaddrinfo', 'socket.gethostby', 'socket.getnameinfo')) "
    "or (event in ('socket.connect', 'socket.bind', 'socket.sendto', 'socket.sendmsg') "
    "and args[1] is not None and not isinstance(args[1], (str, bytes))):\n"
    "    raise PermissionError('network access is disabled in the dcjax sandbox')\n"
    "sys.addaudithook(guard)\n")


def _limits(cfg: SandboxConfig, nproc: int) -> dict[str, int]:
  return {"cpu": cfg.cpu_limit_s, "as": cfg.memory_bytes, "fsize": cfg.file_size_bytes,
          "nproc": nproc, "nofile": int(cfg.max_open_files), "core": 0}


def build_prologue(iso: Isolation, cfg: SandboxConfig, nproc: int) -> str:
  """One line put before the program when the launcher cannot set its limits or give it a
  network namespace ("" otherwise). It shifts the program's line numbers by one."""
  if not iso.needs_prologue:
    return ""
  code = ""
  if iso.prlimit is None:
    pairs = ",".join(f"('RLIMIT_{k.upper()}',{v})" for k, v in _limits(cfg, nproc).items())
    code += ("import resource\nfor k, v in (" + pairs + "):\n"
             "  try: resource.setrlimit(getattr(resource, k), (v, v))\n"
             "  except (ValueError, OSError, AttributeError): pass\n")
  if iso.network != "namespace":
    code += _NET_GUARD
  # exec with a fresh namespace: one line of the program, and no names left behind.
  return f"exec({code!r}, {{}})\n"


def build_command(iso: Isolation, cfg: SandboxConfig, script: str, nproc: int,
                  fstab_path: str = "") -> list[str]:
  """The argv that starts `script`; `fstab_path` is the mount table of its private tmpfs."""
  argv = iso.launcher(fstab_path)
  if iso.prlimit:
    argv += [iso.prlimit] + [f"--{k}={v}:{v}" for k, v in _limits(cfg, nproc).items()] + ["--"]
  argv += list(iso.drop)
  return argv + [cfg.python, "-I", script]


def child_env(workdir: str) -> dict[str, str]:
  """The whole environment of a program (`workdir`: its home and temporary directory):
  nothing of the parent's is passed on."""
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
          "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
          "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _wait_exited(pid: int, timeout_s: float, abort_fd: int | None,
                 abort: threading.Event | None) -> bool:
  """Waits until `pid` has exited, without reaping it (its pid and process group id stay
  reserved, so killing the group afterwards cannot hit a recycled id). False on timeout
  or abort."""
  deadline = time.monotonic() + timeout_s
  try:
    pidfd = os.pidfd_open(pid)
  except (AttributeError, OSError):
    pidfd = None
  if pidfd is not None:
    try:
      poller = select.poll()
      poller.register(pidfd, select.POLLIN)
      if abort_fd is not None:
        poller.register(abort_fd, select.POLLIN)
      ready = poller.poll(max(0.0, timeout_s) * 1000)
      return any(fd == pidfd for fd, _ in ready)
    finally:
      os.close(pidfd)
  delay = 0.001
  while True:  # no pidfd (old kernel, macOS): poll with WNOWAIT
    try:
      if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
        return True
    except ChildProcessError:
      return True
    remaining = deadline - time.monotonic()
    if remaining <= 0 or (abort is not None and abort.is_set()):
      return False
    time.sleep(min(delay, remaining))
    delay = min(delay * 2, 0.02)


def _wait_watched(pid: int, timeout_s: float, abort_fd: int | None,
                  abort: threading.Event | None, work: str, budget: int) -> tuple[bool, bool]:
  """`_wait_exited` that also measures `work` every WATCH_INTERVAL_S (the fallback for hosts
  without a private tmpfs). Returns (exited, over budget)."""
  deadline = time.monotonic() + timeout_s
  while True:
    remaining = deadline - time.monotonic()
    tick = min(private_tmp.WATCH_INTERVAL_S, max(0.0, remaining))
    if _wait_exited(pid, tick, abort_fd, abort):
      return True, False
    if private_tmp.tree_bytes(work) > budget:
      return False, True
    if remaining <= tick or (abort is not None and abort.is_set()):
      return False, False


def _kill_namespace(wrapper_pid: int) -> None:
  """Kills the PID namespace's init (the wrapper's only child) and lets the wrapper reap it.

  The kernel then kills everything else in the namespace before init is gone. Killing
  the whole group at once would orphan init instead, and it would linger as a zombie
  until the host's init reaps it.
  """
  try:
    with open(f"/proc/{wrapper_pid}/task/{wrapper_pid}/children") as f:
      children = [int(pid) for pid in f.read().split()]
  except (OSError, ValueError):
    return
  for pid in children:
    try:
      os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
  _wait_exited(wrapper_pid, 2.0, None, None)


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _tail(path: str, limit: int) -> str:
  try:
    with open(path, "rb") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(max(0, size - limit))
      data = f.read(limit)
  except OSError:
    return ""
  text = data.decode("utf-8", errors="replace")
  if size > limit:
    text = f"[... {size - limit} earlier bytes cut ...]\n" + text
  return text


def _force_rmtree(path: str) -> None:
  def onerror(func, p, _exc):
    try:
      os.chmod(os.path.dirname(p), stat.S_IRWXU)
      os.chmod(p, stat.S_IRWXU)
      func(p)
    except OSError:
      pass
  shutil.rmtree(path, onerror=onerror)


def _verdict(rc: int, token_ok: bool, timed_out: bool, cpu_s: float, cfg: SandboxConfig,
             aborted: bool, over_tmp: bool) -> tuple[str, str]:
  if aborted:
    return "crashed", "stopped: the runner was interrupted"
  if over_tmp:
    return "failed", f"killed: its files passed the {cfg.tmp_bytes >> 20} MB tmp_mb limit"
  if timed_out:
    return "timeout", f"killed at the {cfg.timeout_s:g} s wall-clock limit"
  if rc == 0 and token_ok:
    return "passed", "ran to its end and exited 0"
  # The kernel kills at the limit by its own clock; rusage reads a little lower.
  if rc != 0 and cpu_s >= 0.9 * cfg.cpu_limit_s:
    return "timeout", f"killed at the {cfg.cpu_limit_s} s CPU-time limit"
  if rc == 0:
    return "failed", "exited 0 before its last line ran (early exit)"
  if rc < 0:
    try:
      name = signal.Signals(-rc).name
    except ValueError:
      name = str(-rc)
    return "crashed", f"killed by {name}"
  return "failed", f"exited with status {rc}"


def run_program(source: str, cfg: SandboxConfig, iso: Isolation, *, nproc: int,
                abort_fd: int | None = None, abort: threading.Event | None = None) -> Result:
  """Runs `source` once in the sandbox and returns its Result; raises only on runner bugs."""
  start = time.monotonic()
  tmp = None
  parent_sock = child_sock = None
  script_file = None
  proc = None
  reaped = False

  def crashed(detail: str) -> Result:
    return Result("crashed", None, "", "", time.monotonic() - start, detail)

  try:
    try:
      tmp = tempfile.mkdtemp(prefix="dcjax-sandbox-")
      fstab_path = os.path.join(tmp, "fstab")
      if iso.private_tmp:  # the program starts in its tmpfs and never sees this directory
        work, home = tmp, private_tmp.ROOT
        with open(fstab_path, "w") as f:
          f.write(private_tmp.fstab(iso.private_tmp, cfg.tmp_bytes))
      else:
        work = home = os.path.join(tmp, "work")
        os.mkdir(work, 0o700)
        if iso.drop:
          os.chmod(tmp, 0o711)  # the program's user may traverse, not list
          os.chown(work, iso.uid, iso.gid)
      parent_sock, child_sock = socket.socketpair()
      token = secrets.token_hex(16).encode()
      parent_sock.sendall(token)
      fd = child_sock.fileno()
      script = os.path.join(tmp, "main.py")
      text = build_prologue(iso, cfg, nproc) + source + _EPILOGUE.format(fd=fd)
      with open(script, "wb") as f:
        f.write(text.encode("utf-8", errors="surrogatepass"))
      os.chmod(script, 0o644)
      pass_fds = (fd,)
      if iso.private_tmp:  # read through an inherited descriptor: the path is hidden
        script_file = open(script, "rb")
        pass_fds += (script_file.fileno(),)
        script = f"/dev/fd/{script_file.fileno()}"
      out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
      with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            build_command(iso, cfg, script, nproc, fstab_path), cwd=work,
            env=child_env(home), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            pass_fds=pass_fds, start_new_session=True)
      child_sock.close()
      child_sock = None
    except OSError as e:
      return crashed(f"the sandbox could not start the program: {e}")

    if iso.private_tmp:
      exited, over_tmp = _wait_exited(proc.pid, cfg.timeout_s, abort_fd, abort), False
    else:
      exited, over_tmp = _wait_watched(proc.pid, cfg.timeout_s, abort_fd, abort, work,
                                       cfg.tmp_bytes)
    aborted = not exited and abort is not None and abort.is_set()
    if not exited and iso.pid_namespace:
      _kill_namespace(proc.pid)
    _kill_group(proc.pid)  # stragglers too; the unreaped leader keeps the group id ours
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # someone else reaped it (SIGCHLD set to SIG_IGN?)
      reaped = True
      return crashed("the exit status was lost: the runner's process reaps children itself")
    reaped = True
    proc.returncode = os.waitstatus_to_exitcode(status)
    duration = time.monotonic() - start
    parent_sock.setblocking(False)
    try:
      echoed = parent_sock.recv(256)
    except OSError:
      echoed = b""
    verdict, detail = _verdict(proc.returncode, secrets.compare_digest(echoed, token),
                               not exited and not over_tmp, usage.ru_utime + usage.ru_stime,
                               cfg, aborted, over_tmp)
    limit = int(cfg.output_limit_bytes)
    stderr = _tail(err_path, limit).replace(_WRAPPER_NOISE, "")
    return Result(verdict, proc.returncode, _tail(out_path, limit), stderr, duration, detail)
  finally:
    if proc is not None and not reaped:
      _kill_group(proc.pid)
      try:
        proc.wait()
      except (OSError, subprocess.SubprocessError):
        pass
    for handle in (parent_sock, child_sock, script_file):
      if handle is not None:
        handle.close()
    if tmp is not None:
      _force_rmtree(tmp)

