"""The two-process run of tests/test_quantizer.py, in a module of its own so that the spawned
processes import only torch and the quantizer file (loaded by path, as a remote-code checkpoint
would load it), not transformers: spawning stays fast on a small machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.distributed as dist

QUANTIZER_FILE = Path(__file__).parents[1] / "src" / "hf_mim" / "models" / "quantizer.py"
_spec = importlib.util.spec_from_file_location("standalone_quantizer", QUANTIZER_FILE)
standalone_quantizer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standalone_quantizer)
EmaVectorQuantizer = standalone_quantizer.EmaVectorQuantizer

ROWS_PER_RANK = (40, 24)  # unequal, to exercise the padded gather of the k-means batch
STEPS = 4


def ddp_batches(step: int) -> list[torch.Tensor]:
    """Rank r's features at a step (the same on every process; rank r takes its own). From step 2
    on only two of the four directions appear, so codes die and get restarted."""
    generator = torch.Generator().manual_seed(100 + step)
    centers = torch.eye(8)[:4] if step < 2 else torch.eye(8)[:2]
    batches = []
    for rows in ROWS_PER_RANK:
        picks = torch.randint(centers.shape[0], (rows,), generator=generator)
        batches.append(centers[picks] + 0.2 * torch.randn(rows, 8, generator=generator))
    return batches


def build_pair():
    """The quantizer compared with a single-process run, and one restarting dead codes."""
    torch.manual_seed(0)  # same construction, same global RNG state on every process
    reference = EmaVectorQuantizer(num_codes=16, code_dim=8).train()
    restarting = EmaVectorQuantizer(num_codes=16, code_dim=8, dead_code_restart=True, dead_code_threshold=2,
                                    usage_warning_threshold=0.0).train()
    return reference, restarting


def run_steps(quantizer, rank: int | None) -> list[dict[str, torch.Tensor]]:
    """Every step's state and metrics; rank None = one process on the concatenated batches."""
    history = []
    for step in range(STEPS):
        batches = ddp_batches(step)
        out = quantizer(torch.cat(batches) if rank is None else batches[rank])
        history.append({
            "codebook": quantizer.embedding.weight.clone(), "steps_since_used": quantizer.steps_since_used.clone(),
            "usage": out.codebook_usage, "perplexity": out.perplexity, "dead": out.dead_codes,
        })
    return history


def ddp_worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        reference, restarting = build_pair()
        # Rank 0 as the single-process run of the test; rank 1 differently: only rank 0's draws may count.
        torch.manual_seed(0 if rank == 0 else 1000 + rank)
        reference_history = run_steps(reference, rank)
        restarting_history = run_steps(restarting, rank)
        torch.save({"reference": reference_history, "restarting": restarting_history}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
