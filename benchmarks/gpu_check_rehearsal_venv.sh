#!/usr/bin/env bash
# The rehearsal's venv (REHEARSE=1 benchmarks/gpu_check.sh): only the device image's packages, in its versions
# (gpu_check_image.txt), and the wheels gpu_check_wheels.sh carries, built for this venv's Python (VENV/wheels).
# torch and torchvision: pip here offers no torch 2.11 (the image's) with a torchvision that loads on it without
# the multi-GB CUDA libraries, so the venv links in the torch, torchvision, triton and NVIDIA libraries of the
# Python that runs this script (REHEARSE_TORCH_PYTHON, default python3: the project's, 2.14.1 here).
#
#   bash benchmarks/gpu_check_rehearsal_venv.sh VENV     # made once (minutes), then reused while its inputs match
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$1
TORCH_PYTHON=${REHEARSE_TORCH_PYTHON:-python3}
STAMP=$(cat benchmarks/gpu_check_image.txt benchmarks/gpu_check_wheels.sh | sha256sum | cut -c1-16)
if [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$STAMP" ]; then
  exit 0
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TORCH_SITE=$("$TORCH_PYTHON" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
mkdir -p "$VENV/torch"
for entry in "$TORCH_SITE"/{torch,torchgen,functorch,torchvision,torchvision.libs,triton,nvidia,cuda} \
             "$TORCH_SITE"/{torch,torchvision,triton,nvidia_,cuda_}*.dist-info; do
  if [ -e "$entry" ]; then ln -sfn "$entry" "$VENV/torch/"; fi
done
echo "$VENV/torch" > "$SITE/device_image_torch.pth"
# After the link: pip finds torch (and the NVIDIA libraries) installed and fetches no other build of them.
"$VENV/bin/python" -m pip install -q --no-compile -r benchmarks/gpu_check_image.txt
bash benchmarks/gpu_check_wheels.sh "$VENV/wheels" "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$VENV/bin/python" -c "import torch, torchvision.io, transformers; print('rehearsal venv: torch', torch.__version__,
'transformers', transformers.__version__)"
echo "$STAMP" > "$VENV/.stamp"
