#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $HOME, $pat, ... expand on the workers
# Stops dcjax processes on every worker and frees the TPU (libtpu's lock file).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gcp/stop.sh --name NAME --zone ZONE [options]

On every worker: sends SIGTERM to the `python -m dcjax.main` processes (the trainer then
saves a checkpoint and exits), waits up to --grace seconds, sends SIGKILL to whatever is
left, and removes /tmp/libtpu_lockfile so the next run can open the TPU ("TPU in use").

Required:
  --name NAME          TPU name (env DCJAX_TPU_NAME)
  --zone ZONE          zone (env DCJAX_TPU_ZONE)
Options:
  --project PROJECT    GCP project (env DCJAX_TPU_PROJECT)
  --worker W           worker index, list/range or all (default: all)
  --grace SECONDS      how long to wait after SIGTERM (default: 120)
  --force              SIGKILL at once, without a checkpoint
  --dry-run            print the gcloud command, run nothing
  -h, --help           this help
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=all
GRACE=120
FORCE=0
while [[ $# -gt 0 ]]; do
  split_flag "$1"
  case $FLAG in
    --worker) take_value "$@"; WORKER=$VALUE ;;
    --grace) take_value "$@"; GRACE=$VALUE ;;
    --force) take_switch; FORCE=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$SHIFT_BY"
done

check_common
check_worker --worker "$WORKER"
check_int --grace "$GRACE"
if [[ $FORCE == 1 ]]; then GRACE=0; fi
need_gcloud
location_flags

# pkill/pgrep -f with an anchored pattern: matches `.../python -m dcjax.main ...` but not
# this ssh shell, whose command line contains the pattern text.
remote="pat=$(q "$PROC_RE"); "
remote+='if pgrep -f "$pat" >/dev/null; then '
if [[ $FORCE == 0 ]]; then
  remote+='echo "$(hostname): SIGTERM to $(pgrep -f "$pat" | tr "\n" " ")"; '
  remote+='pkill -TERM -f "$pat" || true; '
  remote+="i=0; while [ \$i -lt $GRACE ] && pgrep -f \"\$pat\" >/dev/null; do "
  remote+='sleep 1; i=$((i + 1)); done; '
fi
remote+='if pgrep -f "$pat" >/dev/null; then '
remote+='echo "$(hostname): SIGKILL to $(pgrep -f "$pat" | tr "\n" " ")"; '
remote+='pkill -KILL -f "$pat" || true; sleep 1; fi; '
remote+='else echo "$(hostname): no dcjax.main running"; fi; '
remote+="rm -f $LIBTPU_LOCK 2>/dev/null || sudo -n rm -f $LIBTPU_LOCK; "
remote+='if [ -e '"$LIBTPU_LOCK"' ]; then echo "$(hostname): could not remove '"$LIBTPU_LOCK"'" >&2; exit 1; fi; '
remote+='echo "$(hostname): stopped"'
ssh_workers "$WORKER" "$remote"
