#!/usr/bin/env bash
# Install dinolab with its test extras into .venv and run the default (CPU) test suite.
# Extra arguments go to pytest (e.g. ./test.sh -m slow, ./test.sh tests/models -x).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
