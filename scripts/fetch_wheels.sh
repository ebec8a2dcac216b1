#!/usr/bin/env bash
# Download, on a machine with network, the pure-Python wheels that the GPU machine lacks, into
# .whl/ (git-ignored). The device call carries them (carry=[".whl"]) and scripts/gpu_check.sh
# installs, offline, those whose modules are missing there (scripts/device_env.py --wheels).
#   bash scripts/fetch_wheels.sh                 # ml_collections (configs/ needs it)
#   bash scripts/fetch_wheels.sh NAME[==VER] ... # others; pure Python only, one version each
# Dependencies are not fetched (--no-deps): ml_collections needs absl-py and PyYAML, which the
# GPU image has. Python 3.12 is the GPU image's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- ml_collections
mkdir -p .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --platform any -d .whl "$@"
ls -l .whl
