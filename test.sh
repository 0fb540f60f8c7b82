#!/usr/bin/env bash
# Install dinolab with its test extras into .venv (skipped when pyproject.toml has not changed since the last
# install) and run the default (CPU) test suite.
# Extra arguments go to pytest (e.g. ./test.sh -m slow, ./test.sh tests/models -x).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-venv.sh
ensure_venv test
exec .venv/bin/python -m pytest -q "$@"
