#!/usr/bin/env bash
# Main job: install dinolab with its web-demo extra into .venv (skipped when pyproject.toml has not changed
# since the last install), then start `dinolab serve` and print the URL (default http://127.0.0.1:8000/).
# With the official ViT-S/14 weights cached or downloadable it serves them; offline without them it says so
# in one line and serves the small model shipped in the repository (src/dinolab/assets/embedded, with its
# segmentation and depth heads): no training at start. `--fallback train` pretrains one on sample photos.
# Extra arguments go to `dinolab serve` (e.g. ./serve.sh --port 8080 --index idx/ --images-root photos/).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-venv.sh
if ! ensure_venv serve; then
    # no package index reachable: go on if an earlier install left everything in place
    .venv/bin/python -c "import dinolab, fastapi, uvicorn, multipart" 2>/dev/null || {
        echo "error: could not install dinolab[serve] (fastapi, uvicorn, python-multipart) into .venv; check the network or a local wheel index (PIP_FIND_LINKS)" >&2
        exit 1
    }
    echo "warning: pip install failed; using the packages already in .venv" >&2
fi
exec .venv/bin/dinolab serve "$@"
