"""What a long run meets besides signals (see test_preemption.py for those): a second run on the same
--output_dir (refused while the first lives; its lock is stale once it was killed), training data that
changed between a stop and the resume (named), and a --dataset_name the Hub cannot serve (one sentence).

Runs are real: `main` of the scripts in this process, a real lock holder in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_mim.finetuning import run as finetune
from hf_mim.pretraining import main
from hf_mim.training.checkpoints import STATE_FILE
from hf_mim.training.tracking import LOG_FILE, read_log
from hf_mim.run_lock import LOCK_FILE, OutputDirLock, OutputDirLockedError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
PRETRAIN = ["--max_steps", "2", "--no-do_eval", "--max_train_samples", "32", "--per_device_train_batch_size", "16",
            "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0"]

HOLD_LOCK = """
import sys, time
from hf_mim.run_lock import OutputDirLock
with OutputDirLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """A live process holding the lock of tmp_path / "run" (ended by the test, or at teardown)."""
    output_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output_dir)], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "locked\n"
    yield output_dir, holder
    if holder.poll() is None:
        holder.kill()
        holder.wait()


def test_a_second_run_is_refused_while_the_first_lives_and_a_killed_runs_lock_is_taken_over(lock_holder, capsys):
    output_dir, holder = lock_holder
    for script_main, args in ((main, PRETRAIN), (finetune.main, ["--max_steps", "1", "--report_to", "none"])):
        with pytest.raises(OutputDirLockedError, match=rf"Another run is using {output_dir} \(pid {holder.pid} on "):
            script_main(["--output_dir", str(output_dir), *args])
    assert not (output_dir / LOG_FILE).exists()  # refused before anything was written
    holder.send_signal(signal.SIGKILL)  # its lock stays behind
    holder.wait()
    assert (output_dir / LOCK_FILE).exists()
    main(["--output_dir", str(output_dir), *PRETRAIN])
    assert f"Taking over the stale lock {output_dir / LOCK_FILE}: the run that held it (pid {holder.pid} " \
        in capsys.readouterr().err
    assert sorted(read_log(str(output_dir / LOG_FILE), "loss")) == [1, 2]
    assert not (output_dir / LOCK_FILE).exists()  # released at the end


def test_a_lock_from_another_host_is_not_guessed_stale(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1234, "host": "gpu-node-7", "since": "yesterday",
                                                  "command": "pretrain.py"}))
    with pytest.raises(OutputDirLockedError, match=rf"another host .*gpu-node-7.*delete {tmp_path / LOCK_FILE}"):
        OutputDirLock(tmp_path).acquire()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """The holder's pid now belongs to another process (this one's parent, started at another time)."""
    stale = {"pid": os.getppid(), "host": socket.gethostname(), "start_time": "1", "command": "pretrain.py"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with OutputDirLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid() == lock.record["pid"]
    assert not (tmp_path / LOCK_FILE).exists()


def write_images(folder: Path, count: int) -> None:
    """`count` small PNGs in one class folder, different from each other."""
    rng = np.random.default_rng(0)
    (folder / "a").mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "a" / f"{index:03d}.png")


def test_data_that_changed_between_a_stop_and_the_resume_is_named(tmp_path, capsys):
    images, output_dir = tmp_path / "images", tmp_path / "run"
    write_images(images, 120)
    every_image = [arg for arg in PRETRAIN if arg not in ("--max_train_samples", "32")]
    args = ["--output_dir", str(output_dir), "--train_dir", str(images), "--train_val_split", "0",
            "--checkpointing_steps", "1", *every_image]
    main([*args, "--max_steps", "1"])  # stopped after step 1 (its checkpoint)
    recorded = json.loads((output_dir / "checkpoint-1" / STATE_FILE).read_text())["data_fingerprint"]
    assert recorded["files"] == 120 and recorded["rows"] == 120
    capsys.readouterr()
    for path in sorted((images / "a").iterdir())[:30]:
        path.unlink()
    main(args)  # the same command, to step 2
    err = capsys.readouterr().err
    assert f"The training data changed since {output_dir / 'checkpoint-1'} was written: 120 files then, 90 now " \
           "(-30); 120 training images then, 90 now (-30)" in err


UNREACHABLE = """
import runpy, sys, time
time.sleep = lambda seconds: None  # huggingface_hub's retries back off for 23 s: the same retries, no waiting
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script,arguments", [("pretrain", PRETRAIN), ("segment", []),
                                              ("probe", ["--config_name", "mae-demo"])])
def test_an_unreachable_dataset_name_is_one_sentence(script, arguments, tmp_path):
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf_home")}  # port 9 (discard): nothing listens, connections are refused
    finished = subprocess.run([sys.executable, "-c", UNREACHABLE, str(ROOT / "examples" / f"{script}.py"),
                               "--output_dir", str(tmp_path / "run"), "--dataset_name", "someone/cats", *arguments],
                              env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1
    output = finished.stdout + finished.stderr
    assert "Retrying" not in output and "thrown while requesting" not in output  # were printed twice each
    assert "Traceback" not in output  # (it ran through datasets' internals)
    assert output.rstrip().splitlines()[-1].startswith(
        "error: --dataset_name someone/cats: the Hub could not be reached and the data set is not in the local cache")


def test_the_fault_matrix_turns_a_timeout_into_a_row_and_ends_the_child(monkeypatch, capsys):
    """benchmarks/fault_matrix.py on a loaded machine: a run past --timeout is a TIMEOUT row, its process group
    is ended, the matrix goes on and the totals count it (it died on its own TimeoutExpired before)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_matrix", ROOT / "benchmarks" / "fault_matrix.py")
    fault_matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fault_matrix)
    monkeypatch.setattr(fault_matrix, "TIMEOUT", 1.0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    fault_matrix.CHILDREN.append(child)
    tally = fault_matrix.Tally()
    fault_matrix.row(tally, "a run that hangs", lambda tally: fault_matrix.communicate(child))
    fault_matrix.row(tally, "the next case", lambda tally: tally.case("the next case", True))
    assert child.poll() == -signal.SIGKILL  # ended, not left running
    assert "TIMEOUT a run that hangs: no exit after 1 s" in capsys.readouterr().out
    assert tally.totals() == ("kills survived: 0 / 0; bad inputs tried: 0; runs with lost or wrong data: 1 "
                              "(of them timeouts: 1)")
