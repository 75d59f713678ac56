"""Sandboxed programs' temporary files: private, capped, gone afterwards
(dcjax.execution.private_tmp and its watchdog fallback)."""

import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from dcjax.execution import Isolation, Sandbox, SandboxConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each program marks every covered directory, waits until all its siblings have done the
# same, lists what it can see (its directories and every /proc/*/root/tmp), leaves a
# SysV shared-memory segment behind, tries to unmount its /tmp from a user namespace of
# its own, fills the tmpfs until ENOSPC (or twice its size, should the cap be broken),
# then ends as its `mode` says. ARGS is put before it.
FILLER = textwrap.dedent("""\
    import ctypes, glob, json, os, time
    token, i, mode, dirs = ARGS["token"], ARGS["i"], ARGS["mode"], ARGS["dirs"]
    report = {"i": i}
    for d in dirs:
      with open(os.path.join(d, f"{token}-mark-{i}"), "w") as f:
        f.write("mine")
    report["marked_at"] = time.monotonic()
    time.sleep(ARGS["settle_s"])
    report["checked_at"] = time.monotonic()
    patterns = [os.path.join(d, token + "*") for d in dirs] + [f"/proc/*/root/tmp/{token}*"]
    report["seen"] = sorted({os.path.basename(p) for pat in patterns for p in glob.glob(pat)})
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    segment = libc.shmget(0, ARGS["sysv_mb"] << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT
    address = libc.shmat(segment, None, 0)
    ctypes.memset(address, 1, ARGS["sysv_mb"] << 20)
    report["sysv"] = libc.shmdt(ctypes.c_void_p(address)) == 0
    if libc.unshare(0x10000000 | 0x00020000) == 0:  # CLONE_NEWUSER | CLONE_NEWNS
      report["unmounted"] = libc.umount2(b"/tmp", 2) == 0  # MNT_DETACH
    chunk, wrote = b"z" * 2**20, 0
    try:
      for k in range(ARGS["max_mb"]):
        with open(os.path.join(dirs[k % len(dirs)], f"{token}-fill-{i}-{k}"), "wb") as f:
          f.write(chunk)
        wrote += len(chunk)
    except OSError as e:
      report["errno"] = e.errno
    report["wrote"] = wrote
    print(json.dumps(report), flush=True)
    if mode == "fail":
      raise SystemExit(3)
    if mode == "crash":
      ctypes.string_at(0)
    if mode == "timeout":
      time.sleep(60)
    """)
MODES = {"pass": "passed", "fail": "failed", "crash": "crashed", "timeout": "timeout"}


def shmem_mb() -> float:
  """Pages in tmpfs and shared memory on the whole host (/proc/meminfo Shmem)."""
  with open("/proc/meminfo") as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))
  return kb / 1024


def entries_with(token: str, dirs) -> list:
  return sorted(p for d in dirs for p in glob.glob(os.path.join(d, f"*{token}*")))


def sandbox_dirs() -> set:
  return set(glob.glob(os.path.join(tempfile.gettempdir(), "dcjax-sandbox-*")))


def test_concurrent_programs_get_private_capped_tmp_that_vanishes():
  tmp_mb, n = 32, 8
  sandbox = Sandbox(SandboxConfig(timeout_s=3, memory_mb=256, tmp_mb=tmp_mb, workers=n))
  iso = sandbox.isolation
  if not iso.private_tmp:
    message = (f"no private tmpfs on this host, only the watchdog fallback (tested below): "
               f"{iso.describe()}; {iso.notes}")
    if os.environ.get("CI") == "true":  # the CI machines have mount namespaces
      pytest.fail(message)
    pytest.skip(message)
  token = secrets.token_hex(6)
  host_dirs = set(iso.private_tmp) | {tempfile.gettempdir()}
  canaries = [os.path.join(d, f"{token}-host") for d in host_dirs]
  for path in canaries:
    with open(path, "w") as f:
      f.write("the trainer's")
  modes = [list(MODES)[i % len(MODES)] for i in range(n)]
  before_dirs, before_shm = sandbox_dirs(), shmem_mb()
  try:
    args = [dict(token=token, i=i, mode=m, dirs=list(iso.private_tmp), settle_s=1.0,
                 max_mb=2 * tmp_mb, sysv_mb=16) for i, m in enumerate(modes)]
    results = sandbox.run_many([f"ARGS = {a!r}\n" + FILLER for a in args])
    after_shm = shmem_mb()
  finally:
    leftovers = entries_with(token, host_dirs)
    for path in leftovers:
      os.remove(path)

  assert [r.status for r in results] == [MODES[m] for m in modes], results
  reports = [json.loads(r.stdout) for r in results]
  # All ran at once: every program had marked before any of them looked.
  assert max(r["marked_at"] for r in reports) < min(r["checked_at"] for r in reports)
  budget = tmp_mb * 2**20
  for i, report in enumerate(reports):
    assert report["seen"] == [f"{token}-mark-{i}"], report  # no sibling's, not the host's
    assert report["sysv"] and not report.get("unmounted"), report
    assert report.get("errno") == 28 and budget - 2 * 2**20 <= report["wrote"] <= budget, report
  assert leftovers == sorted(canaries), "files left on the host"
  assert sandbox_dirs() - before_dirs == set()
  total_mb = sum(r["wrote"] / 2**20 + 16 for r in reports)  # 16: the SysV segment
  assert after_shm - before_shm < total_mb / 4, (before_shm, after_shm, total_mb)


def test_without_mount_namespace_a_watchdog_caps_the_private_workdir():
  """The fallback, forced here: TMPDIR is a private directory, a program that holds more
  than tmp_mb there is killed, and the directory goes. Runs as the current user with no
  namespaces, so only benign programs."""
  iso = Isolation(namespaces=(), prlimit=None, drop=(), network="guard")
  cfg = SandboxConfig(timeout_s=10, tmp_mb=8, workers=2)
  hog = textwrap.dedent("""\
      import time
      for k in range(16):
        open(f"f{k}", "wb").write(b"z" * 2**20)
      time.sleep(30)
      """)
  small = textwrap.dedent("""\
      import os, tempfile
      assert tempfile.gettempdir() == os.getcwd() and os.listdir(".") == []
      open("f", "wb").write(b"z" * 2**20)
      """)
  before = sandbox_dirs()
  results = Sandbox(cfg, isolation=iso).run_many([hog, small])
  assert results[0].status == "failed" and "8 MB tmp_mb limit" in results[0].detail, results[0]
  assert results[0].duration_s < 5, results[0]
  assert results[1].passed, results[1]
  assert sandbox_dirs() - before == set()


def test_non_root_runner_gets_private_tmp_from_a_user_namespace():
  """Runs the runner itself as `nobody` (where this test runs as root) and checks the
  user-namespace tier: capped private /tmp, the runner's uid, no way to unmount it."""
  tools = [shutil.which(name) for name in ("setpriv", "unshare", "mount")]
  python = shutil.which("python3", path="/usr/bin:/bin")
  if os.geteuid() != 0 or not all(tools) or not python:
    pytest.skip("needs root, setpriv, unshare, mount and a system python3 to act as a "
                "non-root runner")
  setpriv, unshare, mount = tools
  as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
  userns = subprocess.run([*as_nobody, unshare, "--user", "--map-root-user", "--mount",
                           mount, "-t", "tmpfs", "none", "/tmp"], capture_output=True)
  if userns.returncode != 0:
    pytest.skip(f"non-root users cannot mount in a user namespace here: "
                f"{userns.stderr.decode()}")
  helper = textwrap.dedent(f"""\
      import json
      from dcjax.execution import Sandbox, SandboxConfig
      sandbox = Sandbox(SandboxConfig(timeout_s=5, tmp_mb=8, workers=1, python={python!r}))
      program = ("import ctypes, os\\n"
                 "libc = ctypes.CDLL(None, use_errno=True)\\n"
                 "print(os.getuid(), os.listdir('/tmp'), os.statvfs('/tmp').f_blocks * "
                 "os.statvfs('/tmp').f_frsize, libc.umount2(b'/tmp', 2), ctypes.get_errno())")
      [result] = sandbox.run_many([program])
      print(json.dumps([sandbox.isolation.describe(), result.status, result.stdout]))
      """)
  out = subprocess.run([*as_nobody, "env", f"PYTHONPATH={REPO}", python, "-c", helper],
                       cwd="/", capture_output=True, text=True, timeout=60)
  if "ModuleNotFoundError" in out.stderr or "Permission denied" in out.stderr:
    pytest.skip(f"{python} cannot import dcjax as nobody here: {out.stderr[-300:]}")
  assert out.returncode == 0, out.stderr
  describe, status, stdout = json.loads(out.stdout.strip().splitlines()[-1])
  assert "tmp=private tmpfs" in describe and "uid 65534" in describe, describe
  assert status == "passed", stdout
  assert stdout.split() == ["65534", "[]", str(8 * 2**20), "-1", "1"]  # EPERM


def test_interpreter_under_a_covered_directory_is_resolved(monkeypatch, tmp_path):
  # A virtual environment under /tmp: the private tmpfs would hide its python symlink.
  link = tmp_path / "venv-python"
  link.symlink_to(os.path.realpath(sys.executable))
  monkeypatch.setattr(sys, "executable", str(link))
  from dcjax.execution import config as config_lib  # pylint: disable=import-outside-toplevel
  inside = any(str(link).startswith(d.rstrip("/") + "/") for d in config_lib.covered_dirs())
  assert inside  # pytest's tmp_path lies under the temporary directory
  assert SandboxConfig().python == os.path.realpath(sys.executable)
  monkeypatch.setattr(sys, "executable", "/opt/python/bin/python3")
  assert SandboxConfig().python == "/opt/python/bin/python3"
