#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice for dcjax, directly or through a queued resource.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gcp/create.sh --name NAME --zone ZONE --accelerator-type TYPE [options] [-- GCLOUD_FLAGS...]

Creates a TPU VM (one host, e.g. v4-8) or a pod slice (several hosts, e.g. v4-32) with
`gcloud compute tpus tpu-vm create`, or, with --spot / --queued, requests it through
`gcloud compute tpus queued-resources create` and waits until it is ACTIVE.

Required:
  --name NAME               TPU name (env DCJAX_TPU_NAME); also the queued resource's id
  --zone ZONE               zone with capacity for TYPE, e.g. us-central2-b (env DCJAX_TPU_ZONE)
  --accelerator-type TYPE   v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ...
Options:
  --version VERSION         TPU runtime version; default by generation:
                              v2/v3/v4: tpu-ubuntu2204-base   v5litepod: v2-alpha-tpuv5-lite
                              v5p: v2-alpha-tpuv5             v6e: v2-alpha-tpuv6e
  --project PROJECT         GCP project (env DCJAX_TPU_PROJECT; default: gcloud's)
  --service-account EMAIL   the account the VMs act as, e.g. for the gs:// workdir (env
                            DCJAX_SERVICE_ACCOUNT; default: the project's default compute
                            service account, PROJECT_NUMBER-compute@developer.gserviceaccount.com,
                            looked up with `gcloud projects describe`)
  --scopes SCOPES           OAuth scopes of that account (default: cloud-platform; access is
                            then governed by IAM roles alone). Both are fixed at creation.
  --spot                    spot capacity through a queued resource (can be reclaimed)
  --queued                  on-demand capacity through a queued resource (waits in the queue)
  --valid-until-duration D  give up the queued request after D, e.g. 6h or 1d (with --spot/--queued)
  --no-wait                 return after the queued request instead of waiting for ACTIVE
  --poll SECONDS            seconds between state checks while waiting (default 30)
  --dry-run                 print the gcloud commands, run nothing
  -h, --help                this help
Anything after `--` is appended to the gcloud create command (e.g. --network=NET).

On-demand pod slices need on-demand TPU quota, which most projects have at 0 ("Quota limit
'TPUV4PodPerProjectPerZoneForTPUAPI' has been exceeded. Limit: 0"); spot quota is separate and
usually granted first: start with --spot (see launch/gcp/README.md, "Capacity and quota").
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TYPE=""
VERSION=""
SPOT=0
QUEUED=0
VALID_UNTIL=""
SERVICE_ACCOUNT=${DCJAX_SERVICE_ACCOUNT:-}
SCOPES=cloud-platform
WAIT=1
POLL=30
EXTRA=()
while [[ $# -gt 0 ]]; do
  split_flag "$1"
  case $FLAG in
    --accelerator-type) take_value "$@"; TYPE=$VALUE ;;
    --version) take_value "$@"; VERSION=$VALUE ;;
    --spot) take_switch; SPOT=1 ;;
    --queued) take_switch; QUEUED=1 ;;
    --valid-until-duration) take_value "$@"; VALID_UNTIL=$VALUE ;;
    --service-account) take_value "$@"; SERVICE_ACCOUNT=$VALUE ;;
    --scopes) take_value "$@"; SCOPES=$VALUE ;;
    --no-wait) take_switch; WAIT=0 ;;
    --poll) take_value "$@"; POLL=$VALUE ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_flag "$@" ;;
  esac
  shift "$SHIFT_BY"
done

check_common
[[ -n $TYPE ]] || die "missing required flag --accelerator-type (e.g. v4-8, v4-32, v5litepod-8, v5p-8)"
type_re='^([a-z0-9]+)-([0-9]+)$'
[[ $TYPE =~ $type_re ]] ||
  die "--accelerator-type '$TYPE' should look like GENERATION-SIZE, e.g. v4-32 or v5litepod-8"
generation=${BASH_REMATCH[1]}
if [[ -z $VERSION ]]; then
  case $generation in
    v2|v3|v4) VERSION=tpu-ubuntu2204-base ;;
    v5litepod|v5e) VERSION=v2-alpha-tpuv5-lite ;;
    v5p) VERSION=v2-alpha-tpuv5 ;;
    v6e) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator generation '$generation': pass --version" ;;
  esac
fi
version_re='^[a-z0-9][-a-z0-9.]*$'
[[ $VERSION =~ $version_re ]] || die "--version '$VERSION' does not look like a TPU runtime version"
check_int --poll "$POLL" 1
if [[ $SPOT == 1 || $QUEUED == 1 ]]; then QUEUED=1; fi
if [[ -n $VALID_UNTIL ]]; then
  [[ $QUEUED == 1 ]] || die "--valid-until-duration needs --spot or --queued"
  duration_re='^([0-9]+[smhd])+$'
  [[ $VALID_UNTIL =~ $duration_re ]] ||
    die "--valid-until-duration '$VALID_UNTIL' should be a duration such as 30m, 6h or 1d"
fi
email_re='^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$'
if [[ -n $SERVICE_ACCOUNT && ! $SERVICE_ACCOUNT =~ $email_re ]]; then
  die "--service-account '$SERVICE_ACCOUNT' should be an email, e.g. NAME@PROJECT.iam.gserviceaccount.com"
fi
scopes_re='^[A-Za-z0-9._:/-]+(,[A-Za-z0-9._:/-]+)*$'
[[ $SCOPES =~ $scopes_re ]] || die "--scopes '$SCOPES' should be a comma-separated list such as cloud-platform"
need_gcloud
location_flags

# The account the VMs act as: given, or the project's default compute service account (what
# the TPU API would pick), passed explicitly so that the command says which one it is.
if [[ -z $SERVICE_ACCOUNT ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    note "no --service-account: a real run looks up the project's default compute service account (PROJECT_NUMBER-compute@developer.gserviceaccount.com) and passes it"
  else
    project=${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}
    number=""
    if [[ -n $project ]]; then
      number=$(gcloud projects describe "$project" --format='value(projectNumber)' 2>/dev/null || true)
    fi
    if [[ $number =~ ^[0-9]+$ ]]; then
      SERVICE_ACCOUNT="$number-compute@developer.gserviceaccount.com"
    else
      warn "could not look up the number of project '${project:-?}': the TPU API picks its default compute service account (pass --service-account to name one)"
    fi
  fi
fi
account=()
if [[ -n $SERVICE_ACCOUNT ]]; then account+=(--service-account="$SERVICE_ACCOUNT"); fi
account+=(--scopes="$SCOPES")

capacity_hint() {
  fail "creating $NAME ($TYPE) failed (gcloud's error above)." \
    "'Quota limit ... has been exceeded. Limit: 0' means the project has no quota of that kind" \
    "for $TYPE in $ZONE: on-demand pod quota is usually 0 and spot quota is separate, so try" \
    "--spot; or request quota (Console: IAM & Admin > Quotas, service tpu.googleapis.com), or" \
    "use a zone your TPU Research Cloud grant names. 'There is no more capacity in the zone'" \
    "means the zone is full: --spot or --queued waits in the queue instead of failing."
}

if [[ $QUEUED == 0 ]]; then
  run_cmd gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
    --accelerator-type="$TYPE" --version="$VERSION" "${account[@]}" \
    ${EXTRA[@]+"${EXTRA[@]}"} || capacity_hint
  note "next: launch/gcp/setup.sh --name $NAME --zone $ZONE --workdir gs://BUCKET/runs"
  exit 0
fi

request=(gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}"
         --node-id="$NAME" --accelerator-type="$TYPE" --runtime-version="$VERSION"
         "${account[@]}")
if [[ $SPOT == 1 ]]; then request+=(--spot); fi
if [[ -n $VALID_UNTIL ]]; then request+=(--valid-until-duration="$VALID_UNTIL"); fi
run_cmd "${request[@]}" ${EXTRA[@]+"${EXTRA[@]}"} || capacity_hint

describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}"
          --format='value(state.state)')
if [[ $WAIT == 0 ]]; then
  note "requested; check the state with: $(fmt_cmd "${describe[@]}")"
  exit 0
fi
if [[ $DRY_RUN == 1 ]]; then
  run_cmd "${describe[@]}"
  note "(repeated every ${POLL}s until the state is ACTIVE; FAILED or SUSPENDED stops)"
  exit 0
fi

printf '+ %s  # every %ss until ACTIVE\n' "$(fmt_cmd "${describe[@]}")" "$POLL" >&2
last=""
errors=0
while :; do
  if state=$("${describe[@]}"); then
    errors=0
  else
    errors=$((errors + 1))
    (( errors < 5 )) || fail "describing queued resource $NAME failed $errors times in a row"
    state=""
  fi
  if [[ $state != "$last" ]]; then
    note "queued resource $NAME: ${state:-(no state yet)}"
    last=$state
  fi
  case $state in
    ACTIVE) break ;;
    FAILED|SUSPENDING|SUSPENDED|DELETING)
      fail "queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" ;;
  esac
  sleep "$POLL"
done
note "$NAME ($TYPE) is ACTIVE; next: launch/gcp/setup.sh --name $NAME --zone $ZONE --workdir gs://BUCKET/runs"
