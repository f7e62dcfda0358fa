"""The base install (no extras: no matplotlib, no tensorboard) runs the examples to their end: model,
card and results written, the figures skipped with a warning. The optional packages are hidden
from real example processes by an import hook (a `sitecustomize` on their PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "tensorboard", "tensorboardX")
# None in sys.modules: `import` raises ModuleNotFoundError and importlib.util.find_spec returns None, which
# is what the availability probes of transformers / accelerate / hf_mim see on a base install.
HIDE = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
"""
COMMON = ["--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "16", "--report_to", "auto",
          "--dataloader_num_workers", "0"]


def run_example(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT / "src")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize(("script", "extra"), [
    ("pretrain.py", ["--per_device_train_batch_size", "16"]),
    ("train_tokenizer.py", ["--method", "dvae", "--per_device_train_batch_size", "16", "--config_overrides",
                            "hidden_size=16,decoder_hidden_size=16,decoder_init_size=16"]),
], ids=["pretrain", "train_tokenizer"])
def test_examples_finish_without_the_optional_packages(tmp_path, script, extra):
    output_dir = tmp_path / "out"
    finished = run_example(tmp_path, script, "--output_dir", str(output_dir), *COMMON, *extra)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "matplotlib is not installed: no reconstructions.png" in finished.stderr
    for name in ("model.safetensors", "config.json", "README.md", "all_results.json", "log.jsonl"):
        assert (output_dir / name).is_file(), name
    assert not (output_dir / "reconstructions.png").exists() and not (output_dir / "runs").exists()
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 2


def test_the_hook_really_hides_them(tmp_path):
    finished = run_example(tmp_path, "pretrain.py", "--help")
    assert finished.returncode == 0
    (tmp_path / "probe.py").write_text("import matplotlib\n")
    hidden = subprocess.run([sys.executable, str(tmp_path / "probe.py")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "hook")})
    assert "ModuleNotFoundError" in hidden.stderr and "matplotlib" in hidden.stderr
