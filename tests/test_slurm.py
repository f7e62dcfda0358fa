"""examples/slurm/pretrain.sbatch against a real one-node Slurm (tests/slurm/start_cluster.sh): a job
signalled with `scancel --signal=USR1` checkpoints, requeues itself and ends with the weights of a job that
was never interrupted. Skipped where Slurm is not installed (`apt-get install -y slurm-wlm munge`, as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_mim.training.tracking import LOG_FILE, read_log

ROOT = Path(__file__).resolve().parents[1]
START_CLUSTER = ROOT / "tests" / "slurm" / "start_cluster.sh"
STEPS = 60  # long enough that the signal (sent after 3 logged steps) comes well before the end
# Two gloo processes on the one node, 8 images each per step; the processes agree to stop at logging steps.
TRAINING = ["--max_steps", str(STEPS), "--max_train_samples", "96", "--per_device_train_batch_size", "8",
            "--do_eval", "false", "--logging_steps", "1", "--checkpointing_steps", "1000", "--report_to", "none",
            "--dataloader_num_workers", "0"]

missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"Slurm is not installed ({', '.join(missing)} missing): "
                                             "apt-get install -y slurm-wlm munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a one-node Slurm needs root (slurmd starts jobs as their users)"),
]


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment that talks to the one-node cluster: a running one, or one started (and stopped) here."""
    was_running = subprocess.run(["bash", str(START_CLUSTER), "status"]).returncode == 0
    result = subprocess.run(["bash", str(START_CLUSTER)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    conf = result.stdout.strip().removeprefix("export SLURM_CONF=")
    yield {**os.environ, "SLURM_CONF": conf}
    if not was_running:
        subprocess.run(["bash", str(START_CLUSTER), "stop"], timeout=60)


def submit(slurm: dict, output_dir: Path, log: Path) -> str:
    env = {**slurm, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PROCESSES_PER_NODE": "2",
           "ACCELERATE_CONFIG": "examples/accelerate_configs/cpu_2proc.yaml",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # `accelerate` of this environment
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    # The cluster has no GPUs and 2 cores: the script's GPU and CPU requests are replaced for it.
    command = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
               "examples/slurm/pretrain.sbatch", "--output_dir", str(output_dir), *TRAINING]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(slurm: dict, job: str) -> str:
    result = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True)
    fields = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    return f"{fields.get('JobState', 'GONE')} restarts={fields.get('Restarts', '?')}"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.5)


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / LOG_FILE
    return sorted(read_log(str(path), "loss")) if path.is_file() else []


def test_a_preempted_job_requeues_itself_and_ends_with_the_uninterrupted_weights(slurm, tmp_path):
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    reference_log, preempted_log = tmp_path / "reference.out", tmp_path / "preempted.out"
    reference = submit(slurm, reference_dir, reference_log)
    preempted = submit(slurm, preempted_dir, preempted_log)

    wait_until(lambda: len(logged_steps(preempted_dir)) >= 3, 300, f"job {preempted} to train 3 steps")
    signal = subprocess.run(["scancel", "--signal=USR1", preempted], env=slurm, capture_output=True, text=True)
    assert signal.returncode == 0, signal.stderr
    for job, log in ((preempted, preempted_log), (reference, reference_log)):
        wait_until(lambda: job_state(slurm, job).startswith("COMPLETED"), 600,
                   f"job {job} to complete ({job_state(slurm, job)}; {log})")

    output = preempted_log.read_text()
    # Checkpointed on the signal (exit 138 = 128 + SIGUSR1), requeued once.
    assert "srun ended with status 138" in output and "start 1:" in output, output
    assert job_state(slurm, preempted) == "COMPLETED restarts=1"
    stopped_at = min(int(path.name.split("-")[1]) for path in preempted_dir.glob("checkpoint-*"))
    assert 3 <= stopped_at < STEPS  # the checkpoint the signal wrote, from which the second start resumed
    assert "Resuming from" in output or (preempted_dir / LOG_FILE).read_text().count('"resume"') == 1
    assert logged_steps(preempted_dir)[-1] == STEPS
    got, expected = load_file(preempted_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
