#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $HOME, $f, ... expand on the workers
# Shows (or follows) a run's log on one worker or on all of them.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gcp/logs.sh --name NAME --zone ZONE [options]

Prints the end of ~/dcjax-logs/RUN.log (default: the newest log there) from one worker or,
with --worker all, from every worker, each line prefixed with the worker's hostname.
Process 0 (worker 0) prints the training progress; the other workers' logs show their own
start-up and errors.

Required:
  --name NAME          TPU name (env DCJAX_TPU_NAME)
  --zone ZONE          zone (env DCJAX_TPU_ZONE)
Options:
  --project PROJECT    GCP project (env DCJAX_TPU_PROJECT)
  --worker W           worker index, list/range (0,2 / 1-3) or all (default: 0)
  --run RUN            the run name given to run.sh (default: the newest log)
  --lines N            lines to show (default: 100)
  -f, --follow         keep following the log (Ctrl-C stops)
  --dry-run            print the gcloud command, run nothing
  -h, --help           this help
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
RUN=""
LINES=100
FOLLOW=0
while [[ $# -gt 0 ]]; do
  split_flag "$1"
  case $FLAG in
    --worker) take_value "$@"; WORKER=$VALUE ;;
    --run) take_value "$@"; RUN=$VALUE ;;
    --lines) take_value "$@"; LINES=$VALUE ;;
    -f|--follow) take_switch; FOLLOW=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$SHIFT_BY"
done

check_common
check_worker --worker "$WORKER"
check_int --lines "$LINES"
run_re='^[A-Za-z0-9][A-Za-z0-9._-]*$'
if [[ -n $RUN && ! $RUN =~ $run_re ]]; then
  die "--run '$RUN' may hold only letters, digits, '.', '_' and '-'"
fi
need_gcloud
location_flags

if [[ -n $RUN ]]; then
  remote="f=$REMOTE_LOGS/$RUN.log; "
else
  remote="f=\$(ls -t $REMOTE_LOGS/*.log 2>/dev/null | head -n 1); "
fi
remote+='if [ -z "$f" ] || [ ! -f "$f" ]; then echo "$(hostname): no log ${f:-in '"$REMOTE_LOGS"'}" >&2; exit 1; fi; '
tail_cmd="tail -n $LINES"
if [[ $FOLLOW == 1 ]]; then tail_cmd+=" -F"; fi
single_re='^[0-9]+$'
if [[ $WORKER =~ $single_re ]]; then
  remote+='echo "==> $(hostname): $f"; '"$tail_cmd"' "$f"'
else
  remote+='h=$(hostname); '"$tail_cmd"' "$f" | sed -u "s|^|[$h] |"'
fi
ssh_workers "$WORKER" "$remote"
