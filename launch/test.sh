#!/usr/bin/env bash
# Installs dcjax with its test extras into ./.venv and runs the whole test suite on CPU
# (tests/conftest.py gives XLA 8 host devices, so sharded code runs on a real mesh).
#   bash launch/test.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
exec .venv/bin/python -m pytest tests "$@"
