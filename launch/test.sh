#!/usr/bin/env bash
# Installs dcjax with its test extras into ./.venv and runs the whole test suite on CPU
# (tests/conftest.py gives XLA 8 host devices, so sharded code runs on a real mesh).
#   bash launch/test.sh [pytest args ...]      DCJAX_TEST_WORKERS=N: N pytest workers (2)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
# Two pytest workers (pytest-xdist) by default: much of the suite is single-threaded compiling
# and Python, so two workers keep two cores busy. DCJAX_TEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest tests -n "${DCJAX_TEST_WORKERS:-2}" "$@"
