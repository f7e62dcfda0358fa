"""The GPU check's first part: every import its parts need, the package versions, the device. Seconds, so
that a missing package or GPU stops the check before it spends the lease. Exit 1: the throughput parts
cannot run (gpu_check.sh stops); exit 3: only the data parts cannot (e.g. the carried datasets does not
import on the image's pyarrow): gpu_check.sh skips those and runs the rest.

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
# What the parts import: throughput.py's, then data_pipeline.py's and the training loop's.
THROUGHPUT_MODULES = ("torch", "transformers", "hf_mim.models", "throughput")
DATA_MODULES = ("torchvision.io", "accelerate", "datasets", "hf_mim.fast_data", "hf_mim.device_decoding",
                "hf_mim.pretraining", "data_pipeline")
THROUGHPUT_FAILED, DATA_FAILED = 1, 3


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def main(path: Path, require_cuda: bool) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    problems, data_problems = import_problems(THROUGHPUT_MODULES), import_problems(DATA_MODULES)
    import torch

    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        problems.append("no CUDA device visible to torch")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "python": sys.version.split()[0], "packages": {name: version(name) for name in PACKAGES},
              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "problems": problems,
              "data_problems": data_problems}
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return THROUGHPUT_FAILED if problems else DATA_FAILED if data_problems else 0


def import_problems(modules) -> list[str]:
    problems = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - every import problem is reported
            problems.append(f"import {module}: {type(error).__name__}: {error}")
    return problems


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--require_cuda" in sys.argv[2:]))
