"""The GPU check's first part: every import its parts need, the package versions, the device. Seconds, so
that a missing package or GPU stops the check before it spends the lease (`gpu_check.sh` aborts on failure).

    python3 benchmarks/gpu_check_preflight.py WORK/preflight.json [--require_cuda]
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import sys
from pathlib import Path

PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "datasets", "huggingface_hub", "safetensors",
            "tokenizers", "numpy", "pillow", "pyarrow", "dill", "multiprocess")
# What the parts import (throughput.py, data_pipeline.py and the training loop they run).
MODULES = ("torch", "torchvision.io", "transformers", "accelerate", "datasets", "hf_mim.models", "hf_mim.fast_data",
           "hf_mim.device_decoding", "hf_mim.pretraining", "throughput", "data_pipeline")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def main(path: Path, require_cuda: bool) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    problems = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - every import problem is reported, then the check stops
            problems.append(f"import {module}: {type(error).__name__}: {error}")
    import torch

    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        problems.append("no CUDA device visible to torch")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "python": sys.version.split()[0], "packages": {name: version(name) for name in PACKAGES},
              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "problems": problems}
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--require_cuda" in sys.argv[2:]))
