#!/usr/bin/env bash
# Main job (command line): install dinolab into .venv (skipped when pyproject.toml has not changed since the
# last install), then write the DINOv2 PCA part-colouring figure of sample photos (shipped with scikit-image)
# with the official ViT-S/14 -> outputs/pca.png. Offline without its weights it says so in one line and uses
# the small model shipped in the repository instead, so the picture is always made.
# Extra arguments go to `dinolab pca` (e.g. ./demo.sh my1.jpg my2.jpg --model dinov2_vitb14).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-venv.sh
ensure_venv
exec .venv/bin/dinolab pca --out outputs/pca.png "$@"
