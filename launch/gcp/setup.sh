#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $HOME, $py, ... expand on the workers
# Installs dcjax on every worker of a TPU VM / pod slice: venv, dcjax[tpu,gcs], configs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gcp/setup.sh --name NAME --zone ZONE [options]

On every worker: a venv in ~/dcjax-venv, dcjax in ~/dcjax installed with
`pip install -e '.[tpu,gcs]'` (jax[tpu] at the pinned jax; gcsfs for gs:// workdirs), and
the configs.
The source is this checkout's HEAD (a `git archive` tarball copied to all workers; edits
not committed are not included) or, with --git-ref, a clone of URL at REF on each worker.
The local configs/ directory (working tree, committed or not) is copied over the source's
configs/ when installing from the checkout, or with --configs in both modes.
Rerunning replaces ~/dcjax and reuses the venv.

Before installing, it checks what a run needs and would otherwise find out late:
  1. ssh reaches every worker (the first `--worker=all` call creates and spreads the key;
     retried, then a clear error);
  2. on a pod slice, an ingress firewall rule on the TPU's network lets the workers reach
     each other on TCP 8482, jax.distributed's coordinator port; without it setup.sh creates
     one (--firewall print: prints the command instead);
  3. with --workdir gs://BUCKET/PATH, every worker can write (and delete) an object there
     as the TPU's service account.
The VMs get Python 3.11 from the deadsnakes PPA where apt has no final 3.11 release (Ubuntu
22.04's own python3.11 is 3.11.0~rc1), else from `uv python install`.

Required:
  --name NAME          TPU name (env DCJAX_TPU_NAME)
  --zone ZONE          zone (env DCJAX_TPU_ZONE)
Options:
  --project PROJECT    GCP project (env DCJAX_TPU_PROJECT)
  --git-ref URL@REF    install from a git remote instead, e.g.
                       https://github.com/ORG/dcjax.git@main (REF: branch, tag or full SHA)
  --configs DIR        config directory to copy to ~/dcjax/configs (default with the local
                       checkout: its configs/; default with --git-ref: none)
  --extras LIST        pip extras (default: tpu,gcs), e.g. tpu,gcs,test
  --python PYTHON      interpreter for the venv (default: python3.11; python3.X is
                       apt-installed where missing)
  --fresh-venv         delete and recreate the venv first
  --workdir gs://B/P   the run's workdir: check that every worker can write to it
  --firewall MODE      create (default): add the missing rule for TCP 8482; print: print
                       the gcloud command (e.g. for an admin) and go on; skip: no check
  --firewall-source-ranges CIDRS
                       where the rule admits traffic from (default: the private ranges
                       10.0.0.0/8,172.16.0.0/12,192.168.0.0/16, i.e. the VPC's VMs)
  --dry-run            print the commands, run nothing
  -h, --help           this help
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GIT_REF=""
CONFIGS=""
EXTRAS=tpu,gcs
PYTHON=python3.11
FRESH=0
WORKDIR=""
FIREWALL=create
SOURCE_RANGES=10.0.0.0/8,172.16.0.0/12,192.168.0.0/16
SSH_TRIES=${DCJAX_SSH_TRIES:-3}
SSH_RETRY_S=${DCJAX_SSH_RETRY_S:-30}
while [[ $# -gt 0 ]]; do
  split_flag "$1"
  case $FLAG in
    --git-ref) take_value "$@"; GIT_REF=$VALUE ;;
    --configs) take_value "$@"; CONFIGS=$VALUE ;;
    --extras) take_value "$@"; EXTRAS=$VALUE ;;
    --python) take_value "$@"; PYTHON=$VALUE ;;
    --fresh-venv) take_switch; FRESH=1 ;;
    --workdir) take_value "$@"; WORKDIR=$VALUE ;;
    --firewall) take_value "$@"; FIREWALL=$VALUE ;;
    --firewall-source-ranges) take_value "$@"; SOURCE_RANGES=$VALUE ;;
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
BUCKET=""
if [[ -n $WORKDIR ]]; then
  bucket_re='^gs://([a-z0-9][-a-z0-9_.]*[a-z0-9])(/.*)?$'
  [[ $WORKDIR =~ $bucket_re ]] || die "--workdir '$WORKDIR' should be gs://BUCKET/PATH"
  BUCKET=${BASH_REMATCH[1]}
fi
case $FIREWALL in create|print|skip) ;; *) die "--firewall must be create, print or skip (got '$FIREWALL')" ;; esac
cidrs_re='^[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+/[0-9]+(,[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+/[0-9]+)*$'
[[ $SOURCE_RANGES =~ $cidrs_re ]] ||
  die "--firewall-source-ranges '$SOURCE_RANGES' should be IPv4 CIDRs such as 10.0.0.0/8,192.168.0.0/16"
check_int DCJAX_SSH_TRIES "$SSH_TRIES" 1
check_int DCJAX_SSH_RETRY_S "$SSH_RETRY_S"
need_gcloud
location_flags
PROJECT_FLAG=()
if [[ -n $PROJECT ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

# ---- checks before installing --------------------------------------------------------------

# split_tabs LINE: FIELDS=(the tab-separated fields of LINE, empty ones included).
split_tabs() {
  local rest="$1"$'\t'
  FIELDS=()
  while [[ $rest == *$'\t'* ]]; do
    FIELDS+=("${rest%%$'\t'*}")
    rest=${rest#*$'\t'}
  done
}

# words LIST: LIST's items (gcloud joins lists with ';' or ',') on separate lines.
words() { printf '%s\n' "$1" | tr ';,' '\n' | sed '/^$/d'; }

ip_int() {  # ip_int A.B.C.D
  local a b c d
  IFS=. read -r a b c d <<<"$1"
  printf '%s' $(( (a << 24) + (b << 16) + (c << 8) + d ))
}

in_cidr() {  # in_cidr IP CIDR
  local net=${2%/*} bits=${2#*/}
  [[ $2 == */* ]] || bits=32
  (( bits == 0 )) && return 0
  local mask=$(( (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF ))
  (( ($(ip_int "$1") & mask) == ($(ip_int "$net") & mask) ))
}

# allows_port ENTRY PORT: ENTRY is one of gcloud's firewall_rule() items: all, tcp, tcp:N, tcp:A-B.
allows_port() {
  local e=$1 lo hi
  case $e in
    all|tcp|6) return 0 ;;
    tcp:*|6:*) e=${e#*:} ;;
    *) return 1 ;;
  esac
  lo=${e%-*} hi=${e#*-}
  [[ $lo =~ ^[0-9]+$ && $hi =~ ^[0-9]+$ ]] && (( lo <= $2 && $2 <= hi ))
}

any_shared() {  # any_shared LIST_A LIST_B: the two lists have an item in common
  local a b
  for a in $(words "$1"); do
    for b in $(words "$2"); do [[ $a == "$b" ]] && return 0; done
  done
  return 1
}

# rule_covers FIELDS...: an enabled ingress rule on $NETWORK that lets every worker reach
# every other one on TCP $COORDINATOR_PORT (fields as printed by the list command below).
rule_covers() {
  local network=$2 direction=$3 disabled=$4 sources=$5 source_tags=$6 target_tags=$7
  local target_accounts=$8 allowed=$9 e ip range ok
  [[ $network == "$NETWORK" && $direction == INGRESS ]] || return 1
  case $disabled in [Tt]rue) return 1 ;; esac
  if [[ -n $target_tags || -n $target_accounts ]]; then
    any_shared "$target_tags" "$TPU_TAGS" || any_shared "$target_accounts" "$TPU_ACCOUNT" || return 1
  fi
  ok=1
  for e in $(words "$allowed"); do allows_port "$e" "$COORDINATOR_PORT" && ok=0; done
  (( ok == 0 )) || return 1
  if [[ -n $source_tags ]] && any_shared "$source_tags" "$TPU_TAGS"; then return 0; fi
  for ip in $(words "$WORKER_IPS"); do
    ok=1
    for range in $(words "$sources"); do in_cidr "$ip" "$range" && ok=0; done
    (( ok == 0 )) || return 1
  done
}

check_ssh() {  # the first --worker=all ssh: key creation and propagation, with retries
  local i=1
  note "check: ssh into every worker"
  until ssh_workers all true; do
    if (( i >= SSH_TRIES )); then
      fail "cannot ssh into every worker of $NAME ($i tries; gcloud's error above)." \
        "The first ssh creates ~/.ssh/google_compute_engine and adds it to the project's" \
        "metadata, which takes a minute to reach the workers; with several workers gcloud" \
        "needs the key in an ssh agent: eval \"\$(ssh-agent -s)\" && ssh-add ~/.ssh/google_compute_engine," \
        "then rerun. Still failing: try one worker for ssh's own error (gcloud compute tpus tpu-vm" \
        "ssh $NAME --zone=$ZONE --worker=0); OS Login projects need roles/compute.osAdminLogin;" \
        "the network must admit tcp:22 (the default network's default-allow-ssh) or, for VMs" \
        "without external IPs, use IAP (--tunnel-through-iap)."
    fi
    note "ssh failed (try $i of $SSH_TRIES): a new key takes a while to reach the workers; retrying in ${SSH_RETRY_S}s"
    sleep "$SSH_RETRY_S"
    i=$((i + 1))
  done
}

check_firewall() {
  local network=${NETWORK:-NETWORK}  # a dry run has not looked it up
  local rule="${network:0:48}-allow-tcp-$COORDINATOR_PORT" why
  local create=(gcloud compute firewall-rules create "$rule" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"}
                --network="$network" --direction=INGRESS --action=ALLOW
                --rules="tcp:$COORDINATOR_PORT" --source-ranges="$SOURCE_RANGES"
                --description="jax.distributed coordinator port between TPU VMs (dcjax launch/gcp/setup.sh)")
  local list=(gcloud compute firewall-rules list ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"}
              --format="value(name,network.basename(),direction,disabled,sourceRanges,sourceTags,targetTags,targetServiceAccounts,allowed[].map().firewall_rule().list())")
  if [[ $DRY_RUN == 1 ]]; then
    run_cmd "${list[@]}"
    note "where no enabled ingress rule on the TPU's network (of a pod slice) allows tcp:$COORDINATOR_PORT from every worker:"
    note "$(fmt_cmd "${create[@]}")"
    return
  fi
  if (( $(words "$WORKER_IPS" | wc -l) < 2 )); then
    note "check: one host, no coordinator traffic between VMs: no firewall rule needed"
    return
  fi
  [[ -n $NETWORK ]] || fail "could not read the network of $NAME from gcloud compute tpus tpu-vm describe"
  note "check: a firewall rule on network $NETWORK lets the workers reach each other on tcp:$COORDINATOR_PORT"
  local rules line
  rules=$("${list[@]}") || fail "listing the firewall rules failed (gcloud's error above)"
  while IFS= read -r line; do
    [[ -n $line ]] || continue
    split_tabs "$line"
    while [[ ${#FIELDS[@]} -lt 9 ]]; do FIELDS+=(""); done
    if rule_covers "${FIELDS[@]}"; then
      note "firewall rule ${FIELDS[0]} allows tcp:$COORDINATOR_PORT between the workers"
      return
    fi
  done <<<"$rules"
  why="no enabled ingress rule on network $NETWORK allows tcp:$COORDINATOR_PORT between the"
  why+=" workers ($(words "$WORKER_IPS" | tr '\n' ' ' | sed 's/ $//')):"
  why+=" jax.distributed.initialize() would wait and then fail"
  if [[ $FIREWALL == print ]]; then
    warn "$why; create the rule with (printed on stdout):"
    fmt_cmd "${create[@]}"
    return
  fi
  note "$why; creating one"
  if ! run_cmd "${create[@]}"; then
    fail "could not create firewall rule $rule (gcloud's error above; it needs compute.firewalls.create," \
      "e.g. roles/compute.securityAdmin). Ask a project admin to run: $(fmt_cmd "${create[@]}")"
  fi
}

check_bucket() {
  local obj scopes=""
  obj="$(q "${WORKDIR%/}/.dcjax-write-test")-\$(hostname)"
  local remote="f=\$(mktemp); echo dcjax > \"\$f\"; "
  remote+="if command -v gcloud >/dev/null 2>&1; then gcloud -q storage cp \"\$f\" $obj && gcloud -q storage rm $obj; "
  remote+="elif command -v gsutil >/dev/null 2>&1; then gsutil -q cp \"\$f\" $obj && gsutil -q rm $obj; "
  remote+='else echo "$(hostname): neither gcloud nor gsutil is installed" >&2; false; fi; '
  remote+='rc=$?; rm -f "$f"; '
  remote+="if [ \$rc -ne 0 ]; then echo \"\$(hostname): cannot write to gs://$BUCKET\" >&2; exit 1; fi; "
  remote+="echo \"\$(hostname): gs://$BUCKET is writable\""
  note "check: every worker can write to gs://$BUCKET (an object under ${WORKDIR%/}/, deleted again)"
  if ! ssh_workers all "$remote"; then
    local account=${TPU_ACCOUNT:-the project\'s default compute service account}
    if [[ -n $TPU_SCOPES ]]; then scopes=" with scopes $(words "$TPU_SCOPES" | sed 's|.*/||' | tr '\n' ' ')"; fi
    fail "a worker of $NAME cannot write to bucket gs://$BUCKET (see above). The TPU VMs act as" \
      "service account $account${scopes% }. Grant it access to the bucket:" \
      "gcloud storage buckets add-iam-policy-binding gs://$BUCKET --member=serviceAccount:${TPU_ACCOUNT:-SERVICE_ACCOUNT}" \
      "--role=roles/storage.objectUser. Scopes are fixed when a TPU is created: without" \
      "cloud-platform or devstorage.read_write, recreate it (launch/gcp/create.sh passes --scopes=cloud-platform)."
  fi
}

NETWORK="" WORKER_IPS="" TPU_TAGS="" TPU_ACCOUNT="" TPU_SCOPES=""
describe=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}"
          --format="value(networkConfig.network.basename(),networkEndpoints[].ipAddress,tags,serviceAccount.email,serviceAccount.scope)")
if [[ $DRY_RUN == 1 ]]; then
  run_cmd "${describe[@]}"
else
  printf '+ %s\n' "$(fmt_cmd "${describe[@]}")" >&2
  info=$("${describe[@]}") || fail "cannot describe TPU $NAME in $ZONE (gcloud's error above): create it with launch/gcp/create.sh"
  split_tabs "${info%%$'\n'*}"
  NETWORK=${FIELDS[0]:-} WORKER_IPS=${FIELDS[1]:-} TPU_TAGS=${FIELDS[2]:-}
  TPU_ACCOUNT=${FIELDS[3]:-} TPU_SCOPES=${FIELDS[4]:-}
fi
check_ssh
if [[ $FIREWALL != skip ]]; then check_firewall; fi
if [[ -n $WORKDIR ]]; then
  check_bucket
else
  warn "no --workdir: not checking that the workers can write to the run's gs:// bucket"
fi

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
  # A final release with venv: Ubuntu 22.04's own python3.11 is 3.11.0~rc1 (jammy-updates,
  # universe) and 24.04 has none, so on Ubuntu apt installs it from the deadsnakes PPA; where
  # apt cannot, uv installs a python-build-standalone build into ~/.local.
  apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600'
  py_ok="\"\$py\" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info.releaselevel != \"final\")' >/dev/null 2>&1"
  ppa="grep -qs '^ID=ubuntu' /etc/os-release && command -v add-apt-repository >/dev/null 2>&1"
  uv='$HOME/.local/bin/uv'
  from_apt="$apt update || true; "
  from_apt+="if $ppa; then sudo add-apt-repository -y ppa:deadsnakes/ppa && $apt update || true; fi; "
  from_apt+="$apt install -y \"\$py\" \"\$py-venv\" || true"
  pip_uv='python3 -m pip install -q --user uv'
  from_uv="echo \"\$(hostname): no final \$py with venv from apt; installing it with uv\" >&2; "
  from_uv+="{ $pip_uv || $pip_uv --break-system-packages; } && "
  from_uv+="$uv python install \"\${py#python}\" && py=\$($uv python find \"\${py#python}\") || true"
  none="echo \"\$(hostname): cannot install \$py (apt, deadsnakes and uv failed; see above):"
  none+=" pass --python /path/to/python3.11\" >&2; exit 1"
  steps+=("if ! $py_ok; then $from_apt; fi" "if ! $py_ok; then $from_uv; fi"
          "if ! $py_ok; then $none; fi")
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
note "next: launch/gcp/run.sh --name $NAME --zone $ZONE --config configs/CONFIG.py --workdir ${WORKDIR:-gs://BUCKET/RUN}"
