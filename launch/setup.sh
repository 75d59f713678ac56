#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs dcjax into it with the given extras.
#   bash launch/setup.sh            # the package
#   bash launch/setup.sh test       # plus the test extras (pytest, torch, transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
spec="."
if [ $# -gt 0 ]; then spec=".[$1]"; fi
.venv/bin/python -m pip install --quiet -e "$spec"
# evalplus 0.3.1 without its declared dependencies: they include code-generation SDKs whose
# protobuf cap (< 6) would break orbax, grain and tfds; what its scoring imports is in the
# `evalplus` extra (docs/evaluation.md).
case "$spec" in
  *test*|*evalplus*) .venv/bin/python -m pip install --quiet --no-deps evalplus==0.3.1 ;;
esac
