#!/usr/bin/env bash
# Main job: install dinolab into .venv, then write the DINOv2 PCA part-colouring figure of sample
# photos (shipped with scikit-image) with the official ViT-S/14 -> outputs/pca.png.
# Extra arguments go to `dinolab pca` (e.g. ./demo.sh my1.jpg my2.jpg --model dinov2_vitb14).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/dinolab pca --out outputs/pca.png "$@"
