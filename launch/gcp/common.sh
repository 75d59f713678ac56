# shellcheck shell=bash
# Shared by launch/gcp/*.sh (sourced, not run): flag parsing and validation, quoting, and
# run_cmd, which prints each command and executes it unless --dry-run was given.
# Written for bash >= 3.2 (macOS's /bin/bash) as well as current Linux bash: no namerefs,
# no associative arrays, and empty arrays expand as ${a[@]+"${a[@]}"} under `set -u`.
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source it

SCRIPT=${SCRIPT:-$(basename "$0")}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# Flags every script takes; name/zone/project may come from the environment instead.
DRY_RUN=0
NAME=${DCJAX_TPU_NAME:-}
ZONE=${DCJAX_TPU_ZONE:-}
PROJECT=${DCJAX_TPU_PROJECT:-}

# Paths on the workers. They stay unexpanded here: $HOME expands in the worker's shell.
# shellcheck disable=SC2016
REMOTE_SRC='$HOME/dcjax'
# shellcheck disable=SC2016
REMOTE_VENV='$HOME/dcjax-venv'
# shellcheck disable=SC2016
REMOTE_LOGS='$HOME/dcjax-logs'
# The trainer's processes and nothing else. The `^...python` anchor keeps pgrep/pkill from
# matching the ssh shell that runs them, whose own command line mentions dcjax.main.
PROC_RE='^[^ ]*python[0-9.]* (-[^ ]+ )*-m dcjax[.]main( |$)'
LIBTPU_LOCK=/tmp/libtpu_lockfile
# The TCP port every host of a pod connects to on worker 0 in jax.distributed.initialize()
# (jax 0.10.2 on Cloud TPU; dcjax/parallel/distributed.py names it too). setup.sh opens it.
COORDINATOR_PORT=8482

die() {  # argument errors: exit status 2
  printf '%s: error: %s\n' "$SCRIPT" "$*" >&2
  exit 2
}

fail() {  # runtime errors: exit status 1
  printf '%s: error: %s\n' "$SCRIPT" "$*" >&2
  exit 1
}

warn() {
  printf '%s: warning: %s\n' "$SCRIPT" "$*" >&2
}

# Progress notes: comments on stdout in a dry run (so its output stays a runnable script),
# stderr otherwise.
note() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '# %s\n' "$*"
  else
    printf '%s: %s\n' "$SCRIPT" "$*" >&2
  fi
}

# q WORD: WORD quoted for a POSIX shell; left bare when it holds only safe characters.
q() {
  local s=$1 r="'\\''"
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$r}"
  fi
}

# fmt_cmd ARGS...: one shell line that reproduces ARGS exactly (--flag=VALUE keeps the
# flag bare and quotes VALUE).
fmt_cmd() {
  local out="" a re='^(--[A-Za-z0-9][A-Za-z0-9-]*=)(.*)$'
  for a in "$@"; do
    if [[ $a =~ $re ]]; then
      out+="${BASH_REMATCH[1]}$(q "${BASH_REMATCH[2]}") "
    else
      out+="$(q "$a") "
    fi
  done
  printf '%s\n' "${out% }"
}

# run_cmd ARGS...: prints the command; runs it unless this is a dry run.
run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    fmt_cmd "$@"
  else
    printf '+ %s\n' "$(fmt_cmd "$@")" >&2
    "$@"
  fi
}

# ---- flag parsing ------------------------------------------------------------------------
# Each script loops:
#   while [[ $# -gt 0 ]]; do
#     split_flag "$1"
#     case $FLAG in
#       --foo) take_value "$@"; FOO=$VALUE ;;
#       --bar) take_switch; BAR=1 ;;
#       *) common_flag "$@" ;;
#     esac
#     shift "$SHIFT_BY"
#   done
# Both `--flag VALUE` and `--flag=VALUE` work.

FLAG=""
INLINE=""
INLINE_SET=0
VALUE=""
SHIFT_BY=1

split_flag() {
  local re='^(--[A-Za-z0-9][A-Za-z0-9-]*)=(.*)$'
  if [[ $1 =~ $re ]]; then
    FLAG=${BASH_REMATCH[1]} INLINE=${BASH_REMATCH[2]} INLINE_SET=1
  else
    FLAG=$1 INLINE="" INLINE_SET=0
  fi
}

take_value() {  # take_value "$@": VALUE from --flag=VALUE or the next argument
  if [[ $INLINE_SET == 1 ]]; then
    VALUE=$INLINE SHIFT_BY=1
  elif [[ $# -ge 2 && $2 != --* ]]; then
    VALUE=$2 SHIFT_BY=2
  else
    die "$FLAG needs a value"
  fi
  [[ -n $VALUE ]] || die "$FLAG needs a non-empty value"
}

take_switch() {
  [[ $INLINE_SET == 0 ]] || die "$FLAG takes no value (got '$FLAG=$INLINE')"
  SHIFT_BY=1
}

common_flag() {
  case $FLAG in
    --name) take_value "$@"; NAME=$VALUE ;;
    --zone) take_value "$@"; ZONE=$VALUE ;;
    --project) take_value "$@"; PROJECT=$VALUE ;;
    --dry-run) take_switch; DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --*) die "unknown flag $FLAG (see --help)" ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
}

# ---- validation --------------------------------------------------------------------------

# check_common: --name and --zone are required; all three must look like GCP identifiers.
check_common() {
  [[ -n $NAME ]] || die "missing required flag --name (the TPU name; or set DCJAX_TPU_NAME)"
  [[ -n $ZONE ]] || die "missing required flag --zone (e.g. us-central2-b; or set DCJAX_TPU_ZONE)"
  local name_re='^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$'
  local zone_re='^[a-z]+-[a-z]+[0-9]+-[a-z]$'
  local project_re='^[a-z][-a-z0-9.:]{4,61}[a-z0-9]$'
  [[ $NAME =~ $name_re ]] || die "--name '$NAME' is not a valid TPU name (lowercase letters," \
    "digits and '-', starting with a letter, at most 63 characters)"
  [[ $ZONE =~ $zone_re ]] || die "--zone '$ZONE' does not look like a zone (e.g. us-central2-b)"
  if [[ -n $PROJECT && ! $PROJECT =~ $project_re ]]; then
    die "--project '$PROJECT' does not look like a project id"
  fi
}

# check_int FLAG VALUE [MIN]
check_int() {
  local re='^[0-9]+$'
  [[ $2 =~ $re ]] || die "$1 must be a non-negative integer (got '$2')"
  if [[ $# -ge 3 ]] && (( $2 < $3 )); then die "$1 must be at least $3 (got '$2')"; fi
}

# check_worker FLAG VALUE: `all`, an index, or a list/range such as 0,2 or 1-3.
check_worker() {
  local re='^(all|[0-9]+([-,][0-9]+)*)$'
  [[ $2 =~ $re ]] || die "$1 must be 'all', a worker index, or a list/range like 0,2 or 1-3 (got '$2')"
}

# gcloud's location flags, appended to every gcloud command.
location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOCATION+=(--project="$PROJECT"); fi
}

need_gcloud() {
  if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
    fail "gcloud not found: install the Google Cloud SDK (or use --dry-run to print the commands)"
  fi
}

# A worker-side snippet that stops the worker's script where a dcjax.main is running.
remote_guard_running() {
  local msg="dcjax.main is running: stop it with launch/gcp/stop.sh first"
  # shellcheck disable=SC2016
  printf 'if pgrep -f %s >/dev/null; then echo "$(hostname): %s" >&2; exit 1; fi' \
    "$(q "$PROC_RE")" "$msg"
}

# ssh_workers WORKER SCRIPT: runs the one-line shell SCRIPT on the TPU's workers.
ssh_workers() {
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}
