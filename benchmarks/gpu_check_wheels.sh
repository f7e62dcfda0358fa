#!/usr/bin/env bash
# The wheels the GPU check carries to the device image, which lacks them (library device KINDS.md: no datasets;
# datasets needs dill and multiprocess, also absent). Everything else the check uses is in the image, in versions
# the check runs with (transformers 5.17, huggingface_hub 1.33: rehearsed by REHEARSE=1 gpu_check.sh).
#
#   bash benchmarks/gpu_check_wheels.sh [DIR] [PYTHON_VERSION]     # default: .whl for the image's Python 3.12
#
# Then name DIR in the device run's `carry`. Pure-Python wheels, about 1 MB; multiprocess is built per Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYTHON_VERSION=${2:-3.12}
# datasets 5.2 asks for dill < 0.4.2 and multiprocess < 0.70.20; huggingface_hub >= 1.31 (the image: 1.33).
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # one version of each: two would stop the install
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${WHEELS[@]}"
ls "$DIR"
