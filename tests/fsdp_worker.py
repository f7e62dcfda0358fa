"""The processes of tests/test_fsdp.py: every hf_mim pre-training model and tokenizer trained with torch's
FSDP2 (`fully_shard`) on gloo through the loop's own step (`loop.train_micro_batch` and
`finish_optimizer_step`), beside the same steps under accelerate's DDP, with a sharded checkpoint
(torch.distributed.checkpoint) written, resumed, and resumed on one process.

accelerate cannot shard on a CPU (it turns a requested FSDP plugin into DDP there, see
`hf_mim.distributed`), so the model is sharded here with torch's API, as accelerate's FSDP2 path does on
GPUs: one FSDP unit per block of the model's `_no_split_modules`, then the root.

Each case runs STEPS optimiser steps on a fixed global batch per step: GLOBAL_BATCH digits, rank r taking
its half (one process: both halves as two accumulated micro-batches, the same arithmetic as DDP's mean).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.utils.data import default_collate

STEPS, SAVE_AT, GLOBAL_BATCH, WORLD = 4, 2, 8, 2
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ---------------------------------------------------------------------------------------------
# The cases: (script, --method, the options it needs); paths filled in by the test
# ---------------------------------------------------------------------------------------------


def tiny_auxiliaries(root: Path) -> dict[str, str]:
    """The frozen networks some methods need: tokenizers (BEiT v2, PeCo), a teacher (VQ-KD), a perceptual
    network (PeCo's tokenizer). Tiny and random, saved like real ones."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from hf_mim import (
        DvaeConfig, DvaeTokenizer, MaeConfig, MaeForPreTraining, PecoConfig, PecoTokenizer, VqkdConfig, VqkdTokenizer,
    )

    vit = dict(num_attention_heads=2, image_size=32, patch_size=4)
    built = {
        "dvae": lambda: DvaeTokenizer(DvaeConfig(hidden_size=8, vocab_size=32, num_groups=3, num_blocks_per_group=1,
                                                 with_decoder=False, reference_fp16=False)),
        "vqkd": lambda: VqkdTokenizer(VqkdConfig(
            hidden_size=16, num_hidden_layers=1, intermediate_size=32, decoder_hidden_size=16,
            decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32, code_dim=8,
            num_codes=32, teacher_dim=8, teacher_name_or_path=None, teacher_type="auto", **vit)),
        "peco": lambda: PecoTokenizer(PecoConfig(image_size=32, downsample_factor=4, hidden_size=8, num_res_blocks=1,
                                                 norm_num_groups=4, code_dim=8, num_codes=32)),
        "teacher": lambda: ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, **vit),
                                    add_pooling_layer=False),
        "mae": lambda: MaeForPreTraining(MaeConfig(
            hidden_size=32, num_hidden_layers=2, intermediate_size=64, decoder_hidden_size=16,
            decoder_num_attention_heads=2, decoder_num_hidden_layers=1, decoder_intermediate_size=32, **vit)),
    }
    paths = {}
    for name, build in built.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        paths[name] = str(root / name)
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(root / "teacher")  # its inputs
    return paths


def cases(auxiliaries: dict[str, str]) -> dict[str, tuple[str, list[str]]]:
    """name -> (script, argv). Drop path is off: the one-process resume seeds the model's own randomness for
    the second half-batch with another process index than rank 1 did (the data and the masks are the same)."""
    no_drop_path = ["--config_overrides", "drop_path_rate=0"]
    return {
        "mae": ("pretrain", ["--method", "mae"]),
        "beit": ("pretrain", ["--method", "beit", "--tokenizer", auxiliaries["dvae"], *no_drop_path]),
        "beitv2": ("pretrain", ["--method", "beitv2", "--tokenizer", auxiliaries["vqkd"], *no_drop_path]),
        "peco": ("pretrain", ["--method", "peco", "--tokenizer", auxiliaries["peco"], *no_drop_path]),
        "vit_mpp": ("pretrain", ["--method", "vit_mpp"]),
        "tokenizer-dvae": ("tokenizer", ["--method", "dvae"]),
        "tokenizer-vqkd": ("tokenizer", ["--method", "vqkd", "--teacher", auxiliaries["teacher"],
                                         "--config_overrides", "num_codes=32"]),
        "tokenizer-peco": ("tokenizer", ["--method", "peco", "--perceptual_model", auxiliaries["mae"]]),
    }


# ---------------------------------------------------------------------------------------------
# One case: the method, its model, its batches
# ---------------------------------------------------------------------------------------------


def build_method(script: str, argv: list[str], output_dir: Path):
    from accelerate.utils import set_seed

    if script == "pretrain":
        from hf_mim.pretraining import get_method as lookup, parse_args
    else:
        from hf_mim.tokenizer_training import get_tokenizer_method as lookup, parse_args
    args = parse_args([*argv, "--output_dir", str(output_dir), "--report_to", "none", "--seed", "0",
                       "--per_device_train_batch_size", str(GLOBAL_BATCH // WORLD), "--learning_rate", "1e-3",
                       "--max_grad_norm", "1.0", "--warmup_steps", "1"])
    method = lookup(args.method)(args)
    set_seed(args.seed)  # the same initial weights in every process and every run
    model = method.build_model(f"{args.method}-demo")
    return args, method, model


@functools.cache
def digits():
    from hf_mim.data import load_image_datasets

    return load_image_datasets(max_train_samples=STEPS * GLOBAL_BATCH, train_val_split=None)


def global_batches(method) -> dict[int, list[dict[str, torch.Tensor]]]:
    """Each step's global batch, as the halves ranks 0 and 1 take, built by the method's own transform."""
    from hf_mim.data import FixedSampler, ImageExamples

    data = digits()
    examples = ImageExamples(data.train, data.image_column, method.train_transform(method.build_image_processor()),
                             image_mode=method.image_mode)
    keys, half = list(FixedSampler(len(examples), 0)), GLOBAL_BATCH // WORLD
    return {step: [default_collate([examples[key] for key in keys[start:start + half]])
                   for start in range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH, half)] for step in range(STEPS)}


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 as accelerate's TRANSFORMER_BASED_WRAP applies it: each `_no_split_modules` block, then the root."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules())[1:]:
        if type(module).__name__ in names:
            fully_shard(module)
    return fully_shard(model)


# ---------------------------------------------------------------------------------------------
# Training through the loop's step
# ---------------------------------------------------------------------------------------------


def make_run(accelerator, args, method, model, sharded: bool):
    from hf_mim.training.checkpoints import TrainerState
    from hf_mim.training.loop import LossMeter, Plan, Run, build_optimization

    if sharded:
        model = shard(model)
    else:
        model = accelerator.prepare_model(model)  # DDP over gloo
    run = Run(args, accelerator, method, data=None, model=model, processor=None)
    run.plan = Plan(None, None, STEPS, GLOBAL_BATCH, args.learning_rate, 1)
    build_optimization(run)
    run.optimizer = accelerator.prepare_optimizer(run.optimizer)  # steps only at accumulation boundaries
    method.setup(accelerator)
    run.meter, run.state = LossMeter(accelerator.device), TrainerState()
    run.model.train()
    return run


def train_steps(run, batches: dict[int, list[dict]], first: int, last: int, halves: list[int]) -> list[float]:
    """Optimiser steps first+1 .. last; each step's micro-batches are the given halves of its global batch."""
    from hf_mim.training.loop import finish_optimizer_step, train_micro_batch

    losses = []
    run.method.after_optimizer_step(first)
    for step in range(first, last):
        run.state.batch_in_epoch = step  # the seed of the model's own randomness (with the process index)
        for half in halves:
            train_micro_batch(run, dict(batches[step][half]))
        assert run.accelerator.sync_gradients
        finish_optimizer_step(run)
        losses.append(run.meter.flush(run.accelerator)["loss"])
    return losses


def training_state(run) -> dict:
    model_state, optimizer_state = get_state_dict(run.model, run.optimizer.optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(),
            "global_step": torch.tensor(run.state.global_step)}


def save_sharded(run, folder: Path) -> None:
    dcp.save(training_state(run), checkpoint_id=str(folder))


def load_sharded(run, folder: Path) -> None:
    """In place: DCP reads each process's part of every tensor, whatever the world size that wrote it."""
    state = training_state(run)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(run.model, run.optimizer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.state.global_step = int(state["global_step"])


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered (collective)."""
    return {key: value.clone() for key, value in get_model_state_dict(model, options=FULL).items()}


def local_fraction(model) -> float:
    """The share of the parameters this process holds."""
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The two phases
# ---------------------------------------------------------------------------------------------


def case_results_two(accelerator, name, script, argv, folder: Path) -> dict:
    """On 2 processes: DDP; FSDP2 with a sharded save at SAVE_AT; FSDP2 resumed from it."""
    rank = accelerator.process_index
    out, checkpoint = folder / name, folder / name / f"sharded-{SAVE_AT}"
    args, method, model = build_method(script, argv, out)
    batches = global_batches(method)
    ddp = make_run(accelerator, args, method, model, sharded=False)
    ddp_losses = train_steps(ddp, batches, 0, STEPS, [rank])
    ddp_weights = full_weights(accelerator.unwrap_model(ddp.model))

    args, method, model = build_method(script, argv, out)
    fsdp = make_run(accelerator, args, method, model, sharded=True)
    fraction = local_fraction(fsdp.model)
    fsdp_losses = train_steps(fsdp, batches, 0, SAVE_AT, [rank])
    save_sharded(fsdp, checkpoint)
    saved = full_weights(fsdp.model)
    fsdp_losses += train_steps(fsdp, batches, SAVE_AT, STEPS, [rank])
    fsdp_weights = full_weights(fsdp.model)

    args, method, model = build_method(script, argv, out)
    resumed = make_run(accelerator, args, method, model, sharded=True)
    load_sharded(resumed, checkpoint)
    resumed_losses = train_steps(resumed, batches, SAVE_AT, STEPS, [rank])
    return {"ddp_losses": ddp_losses, "ddp": ddp_weights, "fsdp_losses": fsdp_losses, "fsdp": fsdp_weights,
            "saved": saved, "resumed_losses": resumed_losses, "resumed": full_weights(resumed.model),
            "local_fraction": fraction, "checkpoint_files": sorted(path.name for path in checkpoint.iterdir())}


def case_results_one(accelerator, name, script, argv, folder: Path) -> dict:
    """On 1 process, from the 2-process checkpoint, both halves accumulated per step: FSDP2, and the
    unsharded model (DCP gathers the shards into whole tensors)."""
    results = {}
    for sharded in (True, False):
        args, method, model = build_method(script, argv, folder / name / "one")
        run = make_run(accelerator, args, method, model, sharded=sharded)
        load_sharded(run, folder / name / f"sharded-{SAVE_AT}")
        loaded = full_weights(run.model)
        losses = train_steps(run, global_batches(method), SAVE_AT, STEPS, list(range(WORLD)))
        results["fsdp" if sharded else "unsharded"] = {"loaded": loaded, "losses": losses,
                                                       "weights": full_weights(run.model)}
    return results


def worker(rank: int, world_size: int, folder: str, port: int, auxiliaries: dict[str, str]) -> None:
    """Every case of `cases(auxiliaries)` (the paths `tiny_auxiliaries` returned), in this process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    folder = Path(folder)
    if world_size == 1:  # accelerate starts no process group for one process; FSDP2 and DCP need one
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-1", rank=0, world_size=1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=WORLD // world_size)
    phase = case_results_two if world_size == WORLD else case_results_one
    try:
        for name, (script, argv) in cases(auxiliaries).items():
            results = phase(accelerator, name, script, argv, folder)
            if rank == 0:
                torch.save(results, folder / name / f"results-{world_size}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()
