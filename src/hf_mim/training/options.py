"""The options `pretrain.py` and `train_tokenizer.py` share, as typed dataclasses (one `--help` group
each), with the names of transformers' and accelerate's example scripts (see SCRIPT_CONVENTIONS).
Options whose default depends on the method, the digits demo or other options are None here and filled
by `arguments.resolve`; their --help gets the method's values (`arguments.build_parser`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Literal

from ..cli import DataSourceArguments, option


def warmup_type(text: str) -> int | float:
    """"10" -> 10 steps; "0.05" -> a ratio of the run."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a fractional warmup is a ratio in [0, 1), got {text}")
    return value


def checkpointing_type(text: str) -> int | str | None:
    if text.lower() in ("epoch", "no", "none"):
        return None if text.lower() != "epoch" else "epoch"
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps, 'epoch' or 'no', got {text!r}") from None
    if steps < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of steps, got {steps}")
    return steps


def json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"min_lr\": 1e-5}}': {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def check_positive(options, names: tuple[str, ...]) -> None:
    """Sizes that could never make a step fail at parsing, before any data is read."""
    for name in names:
        if getattr(options, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(options, name)}.")


@dataclasses.dataclass
class DataArguments(DataSourceArguments):
    _argument_group_name = "data (one source; none = the embedded handwritten digits)"
    _help_overrides = {
        "train_dir": "image folder (class sub-folders optional) for training",
        "train_val_split": "held-out fraction of train when there is no validation split (seeded by --data_seed)",
    }
    label_column_name: str | None = option(help="the label column (default: 'label' when present; optional)")
    cache_dir: str | None = option(help="where datasets and models are cached")
    token: str | None = option(help="Hub token for private data sets and models (default: HF_TOKEN / login)")
    streaming: bool = option(False, help="stream the data set (needs --max_steps)")
    shuffle_buffer_size: int = option(10_000, help="streaming: rows read and permuted together (per lane)")
    stream_lanes: int | None = option(help="streaming: parts of each process's share read side by side, fixed for the "
                                           "run; data-loader workers must divide it (default: the workers at start)")
    data_seed: int | None = option(help="seed of the split, the data order and augmentation (default: --seed)")


@dataclasses.dataclass
class ModelArguments:
    _argument_group_name = "model"
    model_name_or_path: str | None = option(help="continue from these weights (a folder or Hub id)")
    config_name: str | None = option(help="a built-in architecture or a config folder / Hub id (default: the base "
                                          "preset; the demo preset for the digits)")
    model_type: str | None = option(help="the model type, checked against --method")
    config_overrides: str | None = option(help='config fields, e.g. "hidden_size=192,num_hidden_layers=6"')
    image_processor_name: str | None = option(help="image processor folder / Hub id (default: the model's, or new)")
    model_revision: str = option("main", help="branch, tag or commit of Hub models")
    trust_remote_code: bool = option(False, help="allow code from the Hub model repository")
    image_size: int | None = option(help="input resolution (default: the config's)")
    patch_size: int | None = option(help="patch size of a new model (default: the config's)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = option(
        help="attention kernel (default: sdpa)")


@dataclasses.dataclass
class OptimizationArguments:
    """None: the method's recipe (`TrainingMethod.defaults`), else `arguments.GENERAL_DEFAULTS`."""

    _argument_group_name = "batch, learning rate and schedule"
    per_device_train_batch_size: int = option(64)
    per_device_eval_batch_size: int = option(64)
    gradient_accumulation_steps: int = option(1)
    learning_rate: float | None = option(help="absolute learning rate; when given it WINS over --base_learning_rate")
    base_learning_rate: float | None = option(
        help="lr = blr * (batch per device * processes * accumulation) / 256", aliases=["--blr"])
    weight_decay: float | None = option(
        help="AdamW weight decay, not on 1-D parameters, biases and token/position tables")
    adam_beta1: float | None = option()
    adam_beta2: float | None = option()
    adam_epsilon: float = option(1e-8)
    num_train_epochs: float | None = option()
    max_steps: int | None = option(help="optimiser steps in all; overrides --num_train_epochs (alias: "
                                        "--max_train_steps, accelerate's scripts)", aliases=["--max_train_steps"])
    lr_scheduler_type: str | None = option(
        help="any transformers scheduler: cosine, linear, constant_with_warmup, cosine_with_min_lr ...")
    lr_scheduler_kwargs: dict | None = option(
        help='JSON, e.g. \'{"min_lr": 1e-5}\'; the method\'s own apply only with its default scheduler', type=json_dict)
    warmup_steps: int | float | None = option(
        help="an int: steps; a float in [0, 1): a ratio of the run (alias: --num_warmup_steps, accelerate's scripts)",
        aliases=["--num_warmup_steps"], type=warmup_type)
    max_grad_norm: float | None = option(help="clip the gradient norm (0 = no clipping)")
    seed: int = option(42)

    def __post_init__(self):
        check_positive(self, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"))


@dataclasses.dataclass
class SpeedArguments:
    _argument_group_name = "speed and precision (also `accelerate launch --mixed_precision/--dynamo_backend`)"
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(help="default: accelerate's config")
    bf16: bool = option(False, help="= --mixed_precision bf16")
    fp16: bool = option(False, help="= --mixed_precision fp16")
    tf32: bool = option(False, help="allow TF32 matmuls on Ampere+ GPUs")
    torch_compile: bool = option(False, help="compile the model (inductor)")
    torch_compile_mode: str | None = option(help="default, reduce-overhead, max-autotune ...")
    gradient_checkpointing: bool = option(False, help="recompute activations to save memory")
    dataloader_num_workers: int | None = option(
        help="data-loading processes per training process (default: the CPU cores of the process - 1)")
    data_pipeline: Literal["auto", "fast", "reference"] = option(
        "auto", help="fast: crop/flip/masks drawn in the workers, reduced JPEG decoding, uint8 to the device, "
                     "resize + flip + jitter + normalise batched there (same draws, pixels within 1-2 uint8 levels); "
                     "reference: torchvision on PIL images in the workers; auto (default): fast on a GPU, reference "
                     "on a CPU, where the batched resize costs more (see hf_mim.fast_data)")
    jpeg_decoding: Literal["auto", "device", "host"] = option(
        "auto", help="fast pipeline: where JPEGs are decoded. device: the workers ship the files' bytes and the "
                     "training process decodes each batch on its device (nvJPEG on CUDA, batched); host: the workers "
                     "decode (at reduced scale where the crop allows); auto (default): device on CUDA")
    dataloader_pin_memory: bool = option(True)
    dataloader_persistent_workers: bool = option(False)


@dataclasses.dataclass
class CheckpointArguments:
    _argument_group_name = "output, checkpoints and resume"
    output_dir: str | None = option(help="(default: outputs/<script>-<method>)")
    checkpointing_steps: int | str | None = option(
        500, help="save a checkpoint-<step> every N optimiser steps, or at each 'epoch' end, or 'no' (alias: "
                  "--save_steps, the Trainer's)", aliases=["--save_steps"], type=checkpointing_type)
    save_total_limit: int = option(2, help="keep this many newest checkpoints (0: all)")
    resume_from_checkpoint: str | None = option(
        help="a checkpoint-<step> folder, 'latest', or 'none' (default: the newest in --output_dir)")


@dataclasses.dataclass
class EvaluationArguments:
    _argument_group_name = "evaluation, logging and tracking"
    do_train: bool = option(True)
    do_eval: bool | None = option(
        help="masked-patch loss on held-out images with fixed masks (default: when there are some)")
    eval_strategy: Literal["no", "steps", "epoch"] | None = option(
        help="evaluate during training (default: 'steps' when --eval_steps is given, else 'no'; a final "
             "evaluation runs with --do_eval)")
    eval_steps: int | None = option(help="evaluate every N optimiser steps")
    eval_on_start: bool | None = option(help="evaluate before the first step (the baseline of the loss curve)")
    logging_steps: int = option(10, help="log the loss every N optimiser steps")
    report_to: list[str] = option(["auto"], help="trackers besides log.jsonl: tensorboard, wandb, ..., 'all', "
                                                 "'none' (default: tensorboard when installed)")
    with_tracking: bool = option(False, help="= --report_to all")
    run_name: str | None = option(help="tracker run name (default: the output folder's name)")

    def __post_init__(self):
        check_positive(self, ("logging_steps",))


@dataclasses.dataclass
class HubArguments:
    _argument_group_name = "Hugging Face Hub"
    push_to_hub: bool = option(False, help="upload the final model, processor and card")
    hub_model_id: str | None = option(help="NAMESPACE/NAME of the repository")
    hub_token: str | None = option(help="default: HF_TOKEN / the `hf auth login` token")
    hub_private_repo: bool = option(False)
    hub_revision: str | None = option(help="branch to push to")
    hub_strategy: Literal["end"] = option("end", help="only 'end' (upload once the run is done) is supported")


# The groups of --help, in order; the method's own options come after the model's.
LEADING_GROUPS = (DataArguments, ModelArguments)
TRAINING_GROUPS = (OptimizationArguments, SpeedArguments, CheckpointArguments, EvaluationArguments, HubArguments)


__all__ = ["CheckpointArguments", "DataArguments", "EvaluationArguments", "HubArguments", "LEADING_GROUPS",
           "ModelArguments", "OptimizationArguments", "SpeedArguments", "TRAINING_GROUPS", "checkpointing_type",
           "json_dict", "warmup_type"]
