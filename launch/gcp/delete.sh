#!/usr/bin/env bash
# Deletes the TPU VM / pod slice, or the queued resource that holds it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gcp/delete.sh --name NAME --zone ZONE [options]

Deletes the TPU with `gcloud compute tpus tpu-vm delete`, or, with --queued (a TPU made by
create.sh --spot/--queued), the queued resource and its TPU with
`gcloud compute tpus queued-resources delete --force`. The workers' disks go with it;
checkpoints in a gs:// workdir stay.

Required:
  --name NAME          TPU / queued resource name (env DCJAX_TPU_NAME)
  --zone ZONE          zone (env DCJAX_TPU_ZONE)
Options:
  --project PROJECT    GCP project (env DCJAX_TPU_PROJECT)
  --queued             delete the queued resource (and its TPU)
  --yes                no confirmation prompt (gcloud --quiet)
  --async              return without waiting for the deletion
  --dry-run            print the gcloud command, run nothing
  -h, --help           this help
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
YES=0
ASYNC=0
while [[ $# -gt 0 ]]; do
  split_flag "$1"
  case $FLAG in
    --queued) take_switch; QUEUED=1 ;;
    --yes) take_switch; YES=1 ;;
    --async) take_switch; ASYNC=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$SHIFT_BY"
done

check_common
need_gcloud
location_flags

if [[ $QUEUED == 1 ]]; then
  cmd=(gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}")
fi
if [[ $ASYNC == 1 ]]; then cmd+=(--async); fi
if [[ $YES == 1 ]]; then cmd+=(--quiet); fi
run_cmd "${cmd[@]}"
