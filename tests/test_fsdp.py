"""Sharded training, engaged or refused. accelerate cannot shard on a CPU (a requested FSDP or DeepSpeed
plugin becomes plain DDP there): the scripts refuse such a run (hf_mim.distributed), and the model side of
FSDP2 is proven with torch's `fully_shard` on gloo through the loop's own training step
(tests/fsdp_worker.py): every pre-training model and tokenizer trains like DDP, and a sharded
torch.distributed.checkpoint resumes exactly, on 2 processes and on 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from accelerate import Accelerator

import fsdp_worker
from hf_mim.distributed import check_sharding_engaged

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate_configs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Refused: a requested plugin that accelerate would drop
# ---------------------------------------------------------------------------------------------


def test_the_shipped_fsdp_config_is_fsdp2_sharded_by_block_with_sharded_checkpoints():
    config = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"] == {**config["fsdp_config"], "fsdp_version": 2, "fsdp_reshard_after_forward": True,
                                     "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                     "fsdp_state_dict_type": "SHARDED_STATE_DICT"}
    assert "fsdp_sync_module_states" not in config["fsdp_config"]  # FSDP1's; fails on a CPU, obsolete in FSDP2


def test_accelerate_launch_with_the_fsdp_config_on_a_cpu_refuses_instead_of_training_ddp(tmp_path):
    """Before: 2 processes trained plain DDP (accelerate turned the FSDP plugin into MULTI_CPU)."""
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               str(ROOT / "examples" / "pretrain.py"), "--output_dir", str(output_dir), "--max_steps", "2",
               "--max_train_samples", "32", "--per_device_train_batch_size", "8", "--report_to", "none",
               "--dataloader_num_workers", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "asks for FSDP (ACCELERATE_USE_FSDP=true)" in result.stderr
    assert "Refusing to train unsharded" in result.stderr
    assert "cpu_2proc.yaml" in result.stderr  # the way to train on several CPU processes
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "model.safetensors").exists()


def test_a_deepspeed_request_on_a_cpu_is_refused(monkeypatch):
    """accelerate skips DeepSpeed whenever it runs on the CPU (`... and not cpu`)."""
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    accelerator = Accelerator(cpu=True)  # what the request gets on this machine: no DeepSpeed
    check_sharding_engaged(accelerator)  # nothing asked, nothing refused
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as `accelerate launch` sets it from the config
    with pytest.raises(RuntimeError, match=r"asks for DeepSpeed .* on the CPU, where accelerate never shards"):
        check_sharding_engaged(accelerator)


# ---------------------------------------------------------------------------------------------
# Engaged: FSDP2 on gloo, every model, sharded checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """name -> (the 2-process results, the 1-process results); see tests/fsdp_worker.py."""
    folder = tmp_path_factory.mktemp("fsdp")
    auxiliaries = fsdp_worker.tiny_auxiliaries(folder / "auxiliaries")
    names = list(fsdp_worker.cases(auxiliaries))
    mp.spawn(fsdp_worker.worker, args=(2, str(folder), free_port(), auxiliaries), nprocs=2)
    mp.spawn(fsdp_worker.worker, args=(1, str(folder), free_port(), auxiliaries), nprocs=1)
    return {name: tuple(torch.load(folder / name / f"results-{size}.pt", weights_only=False) for size in (2, 1))
            for name in names}


def assert_same_weights(got: dict, expected: dict, rtol: float, atol: float) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


# The models whose step is a function of the batch alone. The others draw inside the forward (the dVAE's
# Gumbel noise, ViT-MPP's corruption: seeded per process, so another world size draws otherwise) or update
# an EMA codebook at every forward (VQ-KD, PeCo: once per global batch on 2 processes, per half-batch on 1).
SAME_ON_ANY_WORLD_SIZE = {"mae", "beit", "beitv2", "peco"}


@pytest.mark.parametrize("name", ["mae", "beit", "beitv2", "peco", "vit_mpp", "tokenizer-dvae", "tokenizer-vqkd",
                                  "tokenizer-peco"])
def test_fsdp2_trains_like_ddp_and_its_sharded_checkpoint_resumes_on_2_and_on_1_process(sharded_runs, name):
    two, one = sharded_runs[name]
    assert 0.45 < two["local_fraction"] < 0.55  # each process holds half of the parameters
    assert any(file.endswith(".distcp") for file in two["checkpoint_files"]) and ".metadata" in two["checkpoint_files"]
    # The same losses and weights as DDP, to rounding (another reduction order for the gradients).
    torch.testing.assert_close(two["fsdp_losses"], two["ddp_losses"], rtol=1e-5, atol=1e-6)
    assert_same_weights(two["fsdp"], two["ddp"], rtol=1e-4, atol=1e-6)
    # Resumed from the sharded checkpoint on 2 processes: steps 3-4 as in the uninterrupted run.
    torch.testing.assert_close(two["resumed_losses"], two["fsdp_losses"][fsdp_worker.SAVE_AT:], rtol=0, atol=0)
    assert_same_weights(two["resumed"], two["fsdp"], rtol=0, atol=0)
    # Resumed on 1 process: DCP reshards the checkpoint to exactly the saved state, sharded or not, and the
    # two continue alike.
    for resumed in one.values():
        assert_same_weights(resumed["loaded"], two["saved"], rtol=0, atol=0)
    torch.testing.assert_close(one["fsdp"]["losses"], one["unsharded"]["losses"], rtol=1e-5, atol=1e-6)
    assert_same_weights(one["fsdp"]["weights"], one["unsharded"]["weights"], rtol=1e-4, atol=1e-6)
    if name in SAME_ON_ANY_WORLD_SIZE:  # and as the uninterrupted 2-process run did
        torch.testing.assert_close(one["fsdp"]["losses"], two["fsdp_losses"][fsdp_worker.SAVE_AT:], rtol=1e-5,
                                   atol=1e-6)
        assert_same_weights(one["fsdp"]["weights"], two["fsdp"], rtol=1e-4, atol=1e-6)
