"""Sandboxed runner: verdicts, limits, cleanup, and hostile programs (dcjax.execution)."""

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from dcjax.execution import Isolation, Result, Sandbox, SandboxConfig, run_programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTILE_TIMEOUT_S = 2.0


def live_tasks_of(uid: int) -> int:
  """Processes of `uid` that are not zombies (plus their threads)."""
  total = 0
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status") as f:
        status = f.read()
    except OSError:
      continue
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields["Uid"].split()[0] == str(uid) and not fields["State"].strip().startswith("Z"):
      total += int(fields["Threads"])
  return total


def sandbox_dirs() -> set:
  return set(glob.glob(os.path.join(tempfile.gettempdir(), "dcjax-sandbox-*")))


@pytest.fixture(scope="module")
def sandbox():
  return Sandbox(SandboxConfig(timeout_s=5, workers=2))


def test_verdicts_in_input_order(sandbox):
  sources = ["print('hi')\nassert 1 + 1 == 2", "assert 1 + 1 == 3", "x = (",
             "raise ValueError('boom')",
             "import os\nassert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']"]
  results = sandbox.run_many(sources)
  assert [r.status for r in results] == ["passed", "failed", "failed", "failed", "passed"]
  assert results[0].stdout == "hi\n" and results[0].returncode == 0
  assert "AssertionError" in results[1].stderr and results[1].returncode == 1
  assert "SyntaxError" in results[2].stderr
  assert "ValueError: boom" in results[3].stderr
  assert all(0 < r.duration_s < 5 for r in results)


def test_environment_is_stripped(sandbox, monkeypatch):
  monkeypatch.setenv("DCJAX_TEST_SECRET", "s3cret")
  program = textwrap.dedent("""\
      import os
      assert "DCJAX_TEST_SECRET" not in os.environ, os.environ
      assert os.environ["HOME"] == os.getcwd()
      assert os.listdir(".") == []
      open("scratch.txt", "w").write("mine")
      """)
  before = sandbox_dirs()
  [result] = sandbox.run_many([program])
  assert result.status == "passed", result
  assert sandbox_dirs() - before == set()  # its directory is gone


def test_output_is_capped_to_its_tail(sandbox):
  cfg = SandboxConfig(timeout_s=5, output_limit_bytes=1000, workers=1)
  result = Sandbox(cfg).run("for i in range(100000):\n  print(i)")
  assert result.status == "passed"
  assert result.stdout.endswith("99998\n99999\n")
  assert len(result.stdout) < 1100 and "earlier bytes cut" in result.stdout


def test_runs_in_parallel():
  sleeper = "import time\ntime.sleep(1.0)"
  start = time.monotonic()
  results = run_programs([sleeper] * 4, timeout_s=5, workers=4)
  elapsed = time.monotonic() - start
  assert all(r.passed for r in results)
  assert elapsed < 3.0, f"4 one-second programs on 4 workers took {elapsed:.1f} s"


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="timeout_s"):
    SandboxConfig(timeout_s=0).validate()
  with pytest.raises(ValueError, match="memory_mb"):
    run_programs(["pass"], memory_mb=-1)
  with pytest.raises(TypeError, match="program #1"):
    run_programs(["pass", b"pass"])


def test_odd_sources_never_raise(sandbox):
  results = sandbox.run_many(["x = '\x00'", "s = '\ud800'", "", "#" * 100_000])
  assert [r.status for r in results] == ["failed", "failed", "passed", "passed"]


def test_isolation_on_this_host(sandbox):
  iso = sandbox.isolation
  if not iso.pid_namespace:
    pytest.skip(f"no PID namespace here: {iso.describe()}")
  [result] = sandbox.run_many(["import os\nassert os.getpid() == 1 and os.getppid() == 0"])
  assert result.passed, result
  assert iso.network == "namespace"


# ----------------------------------------------------------------- hostile programs

HOSTILE = {
    "infinite_loop": "while True:\n  pass",
    "memory_hog": "blocks = []\nwhile True:\n  blocks.append(bytearray(32 * 2**20))",
    "huge_output": "import sys\nwhile True:\n  sys.stdout.write('x' * 65536)",
    "delete_outside": "import os\nos.remove({canary!r})",
    "write_outside": "open({new_file!r}, 'w').write('pwned')",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "early_os_exit": "import os\nos._exit(0)\nassert 1 == 2",
    "early_sys_exit": "import sys\nsys.exit(0)\nassert 1 == 2",
    "early_exit_builtin": "exit()\nassert 1 == 2",
    "raise_system_exit": "raise SystemExit(0)\nassert 1 == 2",
    "patched_sys_exit": "import sys\nsys.exit = lambda *a: None\nassert 1 == 2",
    "patched_assertion_error": (
        "import builtins\nclass Quiet(Exception): pass\nbuiltins.AssertionError = Quiet\n"
        "assert 1 == 2"),
    "excepthook_exits_0": (
        "import os, sys\nsys.excepthook = lambda *args: os._exit(0)\nassert 1 == 2"),
    "atexit_exits_0": "import atexit, os\natexit.register(os._exit, 0)\nassert 1 == 2",
    "fake_success_output": "print('All tests passed!')\nimport os\nos._exit(0)",
    # Only ever runs inside a PID namespace (where it is PID 1 and reaches nobody else).
    "kill_everything": (
        "import os, signal\nif os.getpid() == 1:\n  os.kill(-1, signal.SIGKILL)\nos._exit(0)"),
}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
  """Runs every HOSTILE program in one pool call; returns (results by name, context)."""
  outside = tmp_path_factory.mktemp("outside")
  canary = outside / "canary.txt"
  canary.write_text("keep me")
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(8)
  ctx = {"canary": str(canary), "new_file": str(outside / "new.txt"),
         "port": listener.getsockname()[1]}
  names = list(HOSTILE)
  cfg = SandboxConfig(timeout_s=HOSTILE_TIMEOUT_S, memory_mb=256, file_size_mb=4,
                      output_limit_bytes=4096, workers=2)
  sandbox = Sandbox(cfg)
  before_dirs = sandbox_dirs()
  results = sandbox.run_many([HOSTILE[n].format(**ctx) for n in names])
  listener.settimeout(0.3)
  try:
    conn, _ = listener.accept()
    conn.close()
    connected = True
  except socket.timeout:
    connected = False
  listener.close()
  ctx.update(connected=connected, outside=outside, iso=sandbox.isolation,
             new_dirs=sandbox_dirs() - before_dirs)
  return dict(zip(names, results)), ctx


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_does_not_pass(hostile_run, name):
  results, _ = hostile_run
  result: Result = results[name]
  assert result.status != "passed", result
  assert result.duration_s < HOSTILE_TIMEOUT_S + 3.0, result


def test_hostile_programs_specific_verdicts(hostile_run):
  results, _ = hostile_run
  assert results["infinite_loop"].status == "timeout"
  for name in ("early_os_exit", "early_sys_exit", "raise_system_exit", "excepthook_exits_0",
               "atexit_exits_0", "fake_success_output"):
    assert results[name].status == "failed" and results[name].returncode == 0, name
    assert "early exit" in results[name].detail, name
  assert len(results["huge_output"].stdout) < 4200


def test_hostile_programs_leave_the_host_unchanged(hostile_run):
  _, ctx = hostile_run
  if ctx["iso"].uid == os.geteuid():
    pytest.skip("file protection needs the privilege drop, not available here")
  assert open(ctx["canary"]).read() == "keep me"
  assert sorted(p.name for p in ctx["outside"].iterdir()) == ["canary.txt"]
  assert not ctx["connected"], "a sandboxed program reached a 127.0.0.1 listener"
  assert ctx["new_dirs"] == set(), "temporary directories left behind"
  assert live_tasks_of(ctx["iso"].uid) == 0, "processes of the sandbox user left behind"


def test_fork_bomb_is_bounded_and_cleaned_up():
  cfg = SandboxConfig(timeout_s=1.5, max_processes=8, workers=1)
  sandbox = Sandbox(cfg)
  iso = sandbox.isolation
  if not iso.limits_processes or iso.uid == os.geteuid():
    pytest.skip(f"no process limit for the runner's own uid here: {iso.describe()}")
  limit = sandbox._nproc()
  peak = [0]
  done = threading.Event()

  def watch():
    while not done.is_set():
      peak[0] = max(peak[0], live_tasks_of(iso.uid))
      time.sleep(0.02)

  watcher = threading.Thread(target=watch)
  watcher.start()
  try:
    result = sandbox.run("import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n"
                         "    pass\n")
  finally:
    done.set()
    watcher.join()
  assert result.status == "timeout", result
  assert result.duration_s < 5.0
  assert 0 < peak[0] <= limit, (peak[0], limit)
  assert live_tasks_of(iso.uid) == 0


def test_killing_the_parent_leaves_the_runner_alive():
  # The runner lives in a helper process, so a sandbox failure could not kill pytest.
  helper = textwrap.dedent("""\
      import json
      from dcjax.execution import run_programs
      killer = "import os, signal\\nos.kill(os.getppid(), signal.SIGKILL)\\nos._exit(0)"
      results = run_programs([killer, "assert True"], timeout_s=3, workers=1)
      print(json.dumps([r.status for r in results]))
      """)
  out = subprocess.run([sys.executable, "-c", helper], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1]) == ["failed", "passed"]


def test_fallback_limits_and_network_guard():
  """Without prlimit or namespaces, the first line of the program sets the limits and
  an audit hook refuses sockets (runs as the current user: benign programs only)."""
  iso = Isolation(namespaces=(), prlimit=None, drop=(), network="guard")
  cfg = SandboxConfig(timeout_s=5, memory_mb=512, max_open_files=64, workers=2)
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  port = listener.getsockname()[1]
  limits = textwrap.dedent("""\
      import resource
      assert resource.getrlimit(resource.RLIMIT_AS) == (512 * 2**20,) * 2
      assert resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 64)
      assert resource.getrlimit(resource.RLIMIT_CPU) == (6, 6)
      """)
  results = Sandbox(cfg, isolation=iso).run_many([
      limits, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
      "import socket\nsocket.getaddrinfo('localhost', 80)", "import socket\nsocket.socketpair()",
      "assert 1 == 2"])
  listener.settimeout(0.2)
  with pytest.raises(socket.timeout):
    listener.accept()
  listener.close()
  assert [r.status for r in results] == ["passed", "failed", "failed", "passed", "failed"]
  assert "network access is disabled" in results[1].stderr
  assert "line 2" in results[4].stderr  # the one-line prologue shifts line numbers by 1


def test_abandoned_batch_is_killed_and_cleaned_up():
  sandbox = Sandbox(SandboxConfig(timeout_s=30, workers=2))
  uid = sandbox.isolation.uid

  def sources():
    yield "import time\ntime.sleep(30)"
    yield "import time\ntime.sleep(30)"
    time.sleep(0.5)  # both are running now
    raise RuntimeError("the consumer gave up")

  before = sandbox_dirs()
  start = time.monotonic()
  with pytest.raises(RuntimeError, match="gave up"):
    sandbox.run_many(sources())
  assert time.monotonic() - start < 5.0
  assert sandbox_dirs() - before == set()
  if uid != os.geteuid():
    assert live_tasks_of(uid) == 0
