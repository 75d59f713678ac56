#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $HOME, $py, ... expand on the workers
# Installs dcjax on every worker of a TPU VM / pod slice: venv, dcjax[tpu], configs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gcp/setup.sh --name NAME --zone ZONE [options]

On every worker: a venv in ~/dcjax-venv, dcjax in ~/dcjax installed with
`pip install -e '.[tpu]'` (jax[tpu] at the pinned jax), and the configs.
The source is this checkout's HEAD (a `git archive` tarball copied to all workers; edits
not committed are not included) or, with --git-ref, a clone of URL at REF on each worker.
The local configs/ directory (working tree, committed or not) is copied over the source's
configs/ when installing from the checkout, or with --configs in both modes.
Rerunning replaces ~/dcjax and reuses the venv.

Required:
  --name NAME          TPU name (env DCJAX_TPU_NAME)
  --zone ZONE          zone (env DCJAX_TPU_ZONE)
Options:
  --project PROJECT    GCP project (env DCJAX_TPU_PROJECT)
  --git-ref URL@REF    install from a git remote instead, e.g.
                       https://github.com/ORG/dcjax.git@main (REF: branch, tag or full SHA)
  --configs DIR        config directory to copy to ~/dcjax/configs (default with the local
                       checkout: its configs/; default with --git-ref: none)
  --extras LIST        pip extras (default: tpu), e.g. tpu,test
  --python PYTHON      interpreter for the venv (default: python3.11; python3.X is
                       apt-installed where missing)
  --fresh-venv         delete and recreate the venv first
  --dry-run            print the commands, run nothing
  -h, --help           this help
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GIT_REF=""
CONFIGS=""
EXTRAS=tpu
PYTHON=python3.11
FRESH=0
while [[ $# -gt 0 ]]; do
  split_flag "$1"
  case $FLAG in
    --git-ref) take_value "$@"; GIT_REF=$VALUE ;;
    --configs) take_value "$@"; CONFIGS=$VALUE ;;
    --extras) take_value "$@"; EXTRAS=$VALUE ;;
    --python) take_value "$@"; PYTHON=$VALUE ;;
    --fresh-venv) take_switch; FRESH=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$SHIFT_BY"
done

check_common
extras_re='^[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$'
[[ $EXTRAS =~ $extras_re ]] || die "--extras '$EXTRAS' should be a comma-separated list such as tpu,test"
apt_python_re='^python3\.[0-9]+$'
if [[ ! $PYTHON =~ $apt_python_re && $PYTHON != /* ]]; then
  die "--python '$PYTHON' should be python3.X or an absolute path on the workers"
fi
if [[ -n $GIT_REF ]]; then
  GIT_URL=${GIT_REF%@*}
  REF=${GIT_REF##*@}
  # No '@', or the last '@' belongs to the URL (git@host:org/repo): the ref is missing.
  if [[ $GIT_REF != *@* || -z $GIT_URL || -z $REF || $REF == *:* || $GIT_REF == *[[:space:]]* ]]; then
    die "--git-ref '$GIT_REF' should be URL@REF, e.g. https://github.com/ORG/dcjax.git@main"
  fi
else
  git -C "$REPO_ROOT" rev-parse --verify --quiet HEAD >/dev/null ||
    fail "$REPO_ROOT is not a git checkout with a commit; use --git-ref URL@REF"
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no -- . ':!configs') ]]; then
    warn "uncommitted changes outside configs/ are not uploaded (git archive HEAD); commit them first"
  fi
  CONFIGS=${CONFIGS:-$REPO_ROOT/configs}
fi
if [[ -n $CONFIGS && ! -d $CONFIGS ]]; then die "--configs '$CONFIGS' is not a directory"; fi
need_gcloud
location_flags

# Stage the tarballs locally (a dry run creates only this empty directory).
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/dcjax-setup.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
uploads=()
if [[ -z $GIT_REF ]]; then
  run_cmd git -C "$REPO_ROOT" archive --format=tar.gz -o "$STAGE/dcjax-src.tar.gz" HEAD
  uploads+=("$STAGE/dcjax-src.tar.gz")
fi
if [[ -n $CONFIGS ]]; then
  export COPYFILE_DISABLE=1  # macOS tar: no ._* files or xattr headers
  run_cmd tar -czf "$STAGE/dcjax-configs.tar.gz" --exclude=__pycache__ -C "$CONFIGS" .
  uploads+=("$STAGE/dcjax-configs.tar.gz")
fi
if [[ ${#uploads[@]} -gt 0 ]]; then
  run_cmd gcloud compute tpus tpu-vm scp "${uploads[@]}" "$NAME:" "${LOCATION[@]}" --worker=all
fi

# The script each worker runs (one line; joined with "; " under `set -e`).
steps=('set -e' "$(remote_guard_running)" "py=$(q "$PYTHON")")
if [[ $PYTHON =~ $apt_python_re ]]; then
  apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600'
  has_venv="\"\$py\" -c 'import ensurepip, venv' >/dev/null 2>&1"
  steps+=("if ! $has_venv; then $apt update && $apt install -y \"\$py\" \"\$py-venv\"; fi")
fi
steps+=("rm -rf $REMOTE_SRC")
if [[ -z $GIT_REF ]]; then
  steps+=("mkdir -p $REMOTE_SRC"
          "tar -xzf \$HOME/dcjax-src.tar.gz -C $REMOTE_SRC"
          "rm -f \$HOME/dcjax-src.tar.gz")
else
  steps+=("git init -q $REMOTE_SRC"
          "git -C $REMOTE_SRC fetch -q --depth 1 $(q "$GIT_URL") $(q "$REF")"
          "git -C $REMOTE_SRC checkout -q FETCH_HEAD")
fi
if [[ -n $CONFIGS ]]; then
  steps+=("mkdir -p $REMOTE_SRC/configs"
          "tar -xzf \$HOME/dcjax-configs.tar.gz -C $REMOTE_SRC/configs"
          "rm -f \$HOME/dcjax-configs.tar.gz")
fi
if [[ $FRESH == 1 ]]; then steps+=("rm -rf $REMOTE_VENV"); fi
jax_version="\$($REMOTE_VENV/bin/python -c 'import dcjax, jax; print(jax.__version__)')"
steps+=("if [ ! -x $REMOTE_VENV/bin/python ]; then \"\$py\" -m venv $REMOTE_VENV; fi"
        "$REMOTE_VENV/bin/python -m pip install -q --upgrade pip"
        "cd $REMOTE_SRC"
        "$REMOTE_VENV/bin/python -m pip install -q -e $(q ".[$EXTRAS]")"
        "echo \"\$(hostname): dcjax installed, jax $jax_version\"")
remote=""
for s in "${steps[@]}"; do remote+="$s; "; done
ssh_workers all "${remote%; }"
note "next: launch/gcp/run.sh --name $NAME --zone $ZONE --config configs/CONFIG.py --workdir gs://BUCKET/RUN"
