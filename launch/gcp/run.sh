#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $HOME, $!, ... expand on the workers
# Starts the same dcjax command on every worker, in the background, one log per worker.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gcp/run.sh --name NAME --zone ZONE --config CONFIG --workdir DIR [options]
                         [--config.FIELD=VALUE ...] [-- MORE_DCJAX_FLAGS...]

Runs, on every worker at once (under nohup, so it outlives the ssh session):
  ~/dcjax-venv/bin/python -m dcjax.main --config CONFIG --workdir DIR \
      --config.multihost=True [--config.FIELD=VALUE ...]
in ~/dcjax, with stdout and stderr in ~/dcjax-logs/RUN.log on each worker (appended, so a
resumed run with the same --run-name keeps its history). Refuses to start where a dcjax.main
is already running (launch/gcp/stop.sh stops it).

A pod's hosts share one run: use a gs:// workdir, which all of them reach. Rerunning with
the same --workdir resumes from its latest checkpoint.

Required:
  --name NAME          TPU name (env DCJAX_TPU_NAME)
  --zone ZONE          zone (env DCJAX_TPU_ZONE)
  --config CONFIG      config file relative to ~/dcjax, e.g. configs/small.py
  --workdir DIR        gs://BUCKET/PATH (or a path on each worker, for one-host TPUs)
Options:
  --project PROJECT    GCP project (env DCJAX_TPU_PROJECT)
  --run-name RUN       log name (default: the config's name and the local time)
  --env KEY=VALUE      environment variable for the job; repeatable
  --no-multihost       leave out --config.multihost=True (which makes every host call
                       jax.distributed.initialize(); JAX finds the pod's workers itself)
  --init-timeout S     seconds jax.distributed.initialize() may take (default: 180); after
                       that the job stops with an error that names the coordinator's address
                       and port (TCP 8482 on worker 0) instead of hanging: the usual cause is
                       a network that does not let the workers reach each other there
                       (launch/gcp/setup.sh checks for the firewall rule)
  --config.X=V         config override, passed through as given; repeatable
  --dry-run            print the gcloud command, run nothing
  -h, --help           this help
Anything after `--` is passed to dcjax.main as is.
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
WORKDIR=""
RUN_NAME=""
MULTIHOST=1
INIT_TIMEOUT=180
ENVS=()
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  split_flag "$1"
  case $FLAG in
    --config) take_value "$@"; CONFIG=$VALUE ;;
    --workdir) take_value "$@"; WORKDIR=$VALUE ;;
    --run-name) take_value "$@"; RUN_NAME=$VALUE ;;
    --env) take_value "$@"; ENVS+=("$VALUE") ;;
    --no-multihost) take_switch; MULTIHOST=0 ;;
    --init-timeout) take_value "$@"; INIT_TIMEOUT=$VALUE ;;
    --config.*=*) OVERRIDES+=("$1"); SHIFT_BY=1 ;;
    --config.*) die "config override '$1' needs a value: write $1=VALUE" ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) common_flag "$@" ;;
  esac
  shift "$SHIFT_BY"
done

check_common
[[ -n $CONFIG ]] || die "missing required flag --config (e.g. configs/small.py)"
[[ -n $WORKDIR ]] || die "missing required flag --workdir (e.g. gs://BUCKET/runs/NAME)"
if [[ $WORKDIR != gs://* ]]; then
  warn "--workdir '$WORKDIR' is not a gs:// path: each worker writes its own copy, which only works on a one-host TPU"
elif [[ $WORKDIR == gs:// || $WORKDIR == gs:/// ]]; then
  die "--workdir '$WORKDIR' needs a bucket: gs://BUCKET/PATH"
fi
if [[ -z $RUN_NAME ]]; then
  base=$(basename "${CONFIG%%:*}")
  RUN_NAME="${base%.py}-$(date +%Y%m%d-%H%M%S)"
fi
run_re='^[A-Za-z0-9][A-Za-z0-9._-]*$'
[[ $RUN_NAME =~ $run_re ]] || die "--run-name '$RUN_NAME' may hold only letters, digits, '.', '_' and '-'"
check_int --init-timeout "$INIT_TIMEOUT" 1
env_re='^[A-Za-z_][A-Za-z0-9_]*='
exports=""
if [[ $MULTIHOST == 1 ]]; then exports+="export DCJAX_DISTRIBUTED_TIMEOUT=$INIT_TIMEOUT; "; fi
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ $env_re ]] || die "--env '$kv' should be KEY=VALUE"
  exports+="export ${kv%%=*}=$(q "${kv#*=}"); "
done
need_gcloud
location_flags

job=("$REMOTE_VENV/bin/python" -m dcjax.main --config "$(q "$CONFIG")" --workdir "$(q "$WORKDIR")")
if [[ $MULTIHOST == 1 ]]; then job+=(--config.multihost=True); fi
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do job+=("$(q "$o")"); done
log="$REMOTE_LOGS/$RUN_NAME.log"
remote="set -e; "
remote+="if [ ! -x $REMOTE_VENV/bin/python ]; then "
remote+="echo \"\$(hostname): no dcjax install: run launch/gcp/setup.sh first\" >&2; exit 1; fi; "
remote+="$(remote_guard_running); "
remote+="mkdir -p $REMOTE_LOGS; cd $REMOTE_SRC; $exports"
remote+="nohup ${job[*]} >> $log 2>&1 < /dev/null & "
remote+="echo \"\$(hostname): started pid \$! -> $log\""
ssh_workers all "$remote"
note "logs: launch/gcp/logs.sh --name $NAME --zone $ZONE --run $RUN_NAME --follow"
