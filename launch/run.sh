#!/usr/bin/env bash
# Installs dcjax into ./.venv and runs the main job.
#   bash launch/run.sh configs/tiny.py runs/tiny [--config.field=value ...]
# Exits with dcjax's status: 0 completed, 75 preempted (SIGTERM / Ctrl-C; a checkpoint was
# saved: rerun the same command to resume), 1 error (launch/gcp/README.md has the table).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/tiny.py}
workdir=${2:-runs/tiny}
shift $(( $# > 2 ? 2 : $# ))
bash launch/setup.sh
exec .venv/bin/python -m dcjax.main --config "$config" --workdir "$workdir" "$@"
