"""Command lines of `examples/finetune.py` and `examples/probe.py`: dataclasses parsed with
`HfArgumentParser`, so fine-tuning takes every `TrainingArguments` flag as well (names as in
transformers' and timm's scripts, see SCRIPT_CONVENTIONS), plus the deprecated aliases users still type.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from dataclasses import dataclass

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SaveStrategy

from ..cli import DATA_SOURCES, DataSourceArguments, MimArgumentParser, add_transformers4_names, given, option
from ..recipe import DEMO, PAPER, SMALL_DATA_MAX_IMAGES, RecipeInputs, explicit_options, recipe_line
from ..training import data_loading
from .ema import DEFAULT_DECAY, check_decay


@dataclass
class DataArguments(DataSourceArguments):
    """One data source (none: scikit-learn's handwritten digits, embedded, offline)."""

    _help_overrides = {"train_dir": "image folder for training (class sub-folders give the labels)"}
    label_column_name: str | None = option(help="the column of integer class ids (default: 'label')")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = option(
        help="hf_mim checkpoint (folder or Hub id): pre-training, classification or converted reference weights. "
             "None: train a tiny model from scratch on the digits demo (or --config_name)")
    config_name: str | None = option(
        help="train from scratch: a pre-training preset (mae-demo, mae-base, ...) or a config folder / Hub id")
    image_processor_name: str | None = option(
        help="use this image processor for evaluation (default: resize + centre crop with the checkpoint's mean/std)")
    model_revision: str = option("main", help="branch, tag or commit of Hub models")
    trust_remote_code: bool = option(False, help="allow code from the Hub model repository")
    cache_dir: str | None = option(help="where data sets and models are cached")
    token: str | None = option(help="Hub token for private data sets and models (default: HF_TOKEN / login)")
    ignore_mismatched_sizes: bool = option(False, help="replace a classification head whose class count differs")
    image_size: int | None = option(help="fine-tune at this resolution (position tables resized; default: the config's)")
    method: str | None = option(help="pre-training method for the model card (default: from the model type)")

    def hub_kwargs(self) -> dict:
        return {"revision": self.model_revision, "token": self.token, "cache_dir": self.cache_dir,
                "trust_remote_code": self.trust_remote_code}


@dataclass
class FinetuningArguments:
    """The BEiT / MAE fine-tuning recipe (defaults: MAE's `main_finetune.py`)."""

    base_learning_rate: float | None = option(
        help="lr = blr * total batch / 256 (default 1e-3 unless --learning_rate is given)", aliases=["--blr"])
    layer_decay: float = option(0.75, help="layer-wise lr decay: layer i trains at lr * decay^(L+1-i); 1 = off")
    drop_path: float | None = option(0.1, help="stochastic depth rate of the last block (None: the config's)")
    smoothing: float = option(0.1, help="label smoothing")
    mixup: float = option(0.0, help="MixUp Beta alpha (0 = off; recipes use 0.8)")
    cutmix: float = option(0.0, help="CutMix Beta alpha (0 = off; recipes use 1.0)")
    mixup_prob: float = option(1.0, help="probability of mixing a batch")
    mixup_switch_prob: float = option(0.5, help="with both on: probability of CutMix rather than MixUp")
    aa: str | None = option("rand-m9-mstd0.5-inc1", help="RandAugment (timm string; timm's own when installed, "
                             "else torchvision's m/n only) or 'none'")
    reprob: float = option(0.25, help="random erasing probability (per-pixel random values)")
    crop_min_scale: float = option(0.08, help="RandomResizedCrop smallest area fraction")
    hflip: float = option(0.5, help="horizontal flip probability")
    crop_pct: float = option(0.875, help="evaluation: resize to image_size / crop_pct, then centre crop")
    model_ema: bool = option(
        False, help="keep an exponential moving average of the weights (timm's): updated after every optimizer step, "
                    "saved as ema.safetensors in each checkpoint-<step> and restored on resume; the final evaluation "
                    "and the saved model are the EMA weights (evaluations during training are of the raw ones). "
                    "One device or DDP, not FSDP / DeepSpeed; not with --load_best_model_at_end")
    model_ema_decay: float = option(
        DEFAULT_DECAY, help="EMA decay, in (0, 1): ema = decay * ema + (1 - decay) * weights, each optimizer step")


# Settings of the digits demo (no data source given) that differ from the general defaults; a
# from-scratch model (no --model_name_or_path) also gets no layer decay and no drop path.
# 5 epochs (120 steps of 64) at blr 8e-3 fine-tune the pre-training demo (`examples/pretrain.py`) to
# top-1 0.94 (top-5 1.0) on the 270 held-out digits (chance 0.1) in 1-3 minutes on 2 shared CPU cores
# (measured 2026-12-03: 1m14s wall, 2m58s beside another run); at blr 4e-3 the same 5 epochs reach 0.83,
# at 1e-3 0.62; 10 epochs at 4e-3 reach 0.97 in twice the time (the general recipe's 50: ten times).
DEMO_DATA_DEFAULTS = {"aa": "none", "reprob": 0.0, "hflip": 0.0, "crop_min_scale": 0.35, "crop_pct": 1.0,
                      "num_train_epochs": 5.0, "base_learning_rate": 8e-3}
FROM_SCRATCH_DEFAULTS = {"layer_decay": 1.0, "drop_path": 0.0, "num_train_epochs": 15.0, "base_learning_rate": 4e-3}
# The data-size rule (hf_mim.recipe): from scratch (--config_name) on fewer than 50,000 images, the digits
# demo's from-scratch recipe without its schedule. Layer decay and drop path regularise a pre-trained encoder
# over hundreds of epochs, RandAugment and random erasing a model that sees a million images; a model learning
# from nothing on a small set needs none of them, and a higher rate. On 1,000 CIFAR-10 labels, 100 steps, 2
# seeds: top-1 0.191 with the paper's recipe, 0.216 with layer decay 1 / drop path 0 / blr 4e-3, 0.254 with
# RandAugment and erasing off too (benchmarks/RESULTS.md).
SMALL_DATA_DEFAULTS = {"layer_decay": 1.0, "drop_path": 0.0, "base_learning_rate": 4e-3, "aa": "none",
                       "reprob": 0.0}
DEFAULT_BASE_LEARNING_RATE = 1e-3  # MAE's main_finetune.py default (BEiT: 4e-3 at batch 1024, the same)
# The recipe settings (FinetuningArguments' and TrainingArguments' fields) resolved by `resolve_finetuning_recipe`
# and printed at the start of a run.
RECIPE_NAMES = ("base_learning_rate", "learning_rate", "per_device_train_batch_size", "num_train_epochs",
                "warmup_steps", "lr_scheduler_type", "weight_decay", "layer_decay", "drop_path", "smoothing", "aa",
                "mixup", "cutmix", "reprob", "crop_min_scale", "hflip", "crop_pct")
TRAINING_DEFAULTS = {
    "output_dir": "outputs/finetune", "per_device_train_batch_size": 64, "per_device_eval_batch_size": 64,
    "num_train_epochs": 50.0, "weight_decay": 0.05, "lr_scheduler_type": "cosine", "warmup_steps": 0.1,
    "eval_strategy": "epoch", "save_strategy": "epoch", "logging_steps": 10, "save_total_limit": 2,
    "remove_unused_columns": False, "report_to": "none", "do_train": True, "do_eval": True,
}


def default_num_workers() -> int:
    """As pre-training: the CPU cores of this process (cores / local processes), less one for training."""
    return data_loading.default_num_workers(num_processes=1)  # LOCAL_WORLD_SIZE, when launched, wins


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


class CheckpointingSteps(argparse.Action):
    """accelerate-script style `--checkpointing_steps N | epoch | no` -> save_strategy (+ save_steps)."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = values.strip().lower()
        if value in ("epoch", "no"):
            namespace.save_strategy = value
        elif value.isdigit() and int(value) > 0:
            namespace.save_strategy, namespace.save_steps = "steps", int(value)
        else:
            parser.error(f"{option_string} takes a number of optimizer steps, 'epoch' or 'no', got {values!r}.")


class MixedPrecision(argparse.Action):
    """pretrain.py's (and accelerate's) `--mixed_precision no | fp16 | bf16` -> --bf16 / --fp16."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.bf16, namespace.fp16 = values == "bf16", values == "fp16"


def add_aliases(parser: MimArgumentParser) -> None:
    """Names of transformers 4 / accelerate / timm scripts, mapped onto TrainingArguments fields."""
    # The accelerate (no_trainer) scripts' names: synonyms, without a warning, as in pretrain.py.
    parser.add_alias(["--max_train_steps"], "max_steps", type=int, help="alias of --max_steps (accelerate's scripts)")
    parser.add_alias(["--num_warmup_steps"], "warmup_steps", type=float,
                     help="alias of --warmup_steps (accelerate's scripts)")
    # pretrain.py's names for the same settings: one spelling in every script.
    parser.add_alias(["--with_tracking"], "report_to", action="store_const", const="all",
                     help="= --report_to all (accelerate's scripts, pretrain.py)")
    parser.add_argument("--mixed_precision", action=MixedPrecision, choices=["no", "fp16", "bf16"],
                        dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                        help="= --bf16 / --fp16 (accelerate's name, pretrain.py)")
    parser.add_argument("--checkpointing_steps", action=CheckpointingSteps, metavar="{N,epoch,no}",
                        dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                        help="save a checkpoint-<step> every N optimizer steps, at each epoch's end, or never "
                             "(= --save_strategy / --save_steps)")
    add_transformers4_names(parser)


def check_model_ema(argv: list[str], finetuning_args: FinetuningArguments) -> None:
    if finetuning_args.model_ema:
        check_decay(finetuning_args.model_ema_decay)
    elif given(argv, "model_ema_decay"):
        warnings.warn("--model_ema_decay does nothing without --model_ema.", stacklevel=3)


def note_demo_defaults(parser: argparse.ArgumentParser) -> None:
    """--help shows the defaults of a run on your data; the digits demo's own go into the help text."""
    for action in parser._actions:
        notes = [f"{where}: {values[action.dest]}" for where, values in (
            ("digits demo", DEMO_DATA_DEFAULTS), ("from scratch on the digits", FROM_SCRATCH_DEFAULTS),
            (f"from scratch on < {SMALL_DATA_MAX_IMAGES:,} images", SMALL_DATA_DEFAULTS))
            if action.dest in values]
        if notes and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} ({'; '.join(notes)})".strip()


def check_step_settings(argv: list[str], training_args) -> None:
    """Refuse sizes that could never make a step (before any data is read), and make `--save_steps N`
    alone save every N steps: the default save strategy here is per epoch, which would ignore it."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(training_args, name)}.")
    if given(argv, "save_steps") and not given(argv, "save_strategy") and not given(argv, "checkpointing_steps"):
        training_args.save_strategy = SaveStrategy.STEPS


def parse_finetuning_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, FinetuningArguments, TrainingArguments) with the fine-tuning
    defaults, the demo's where it applies, and no boilerplate flags needed. The recipe is resolved by
    `resolve_finetuning_recipe` (again by run.py once the data's size is known)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = MimArgumentParser((ModelArguments, DataArguments, FinetuningArguments, TrainingArguments))
    add_aliases(parser)
    if any(arg in ("-h", "--help") for arg in argv):  # the defaults of a run on your data, and the demo's beside them
        note_demo_defaults(parser)
    parser.set_defaults(**TRAINING_DEFAULTS, use_cpu=not has_accelerator(),
                        dataloader_num_workers=default_num_workers())
    model_args, data_args, finetuning_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    explicit = explicit_options(parser, argv, RECIPE_NAMES)
    if {"learning_rate", "base_learning_rate"} <= explicit:
        raise ValueError("Give either --learning_rate (absolute) or --base_learning_rate (scaled by batch / 256), "
                         "not both.")
    user = {name: getattr(finetuning_args, name, getattr(training_args, name, None)) for name in explicit}
    demo, pretrained = not any(given(argv, name) for name in DATA_SOURCES), given(argv, "model_name_or_path")
    finetuning_args.recipe_inputs = RecipeInputs(
        recipe_layers(demo, demo_from_scratch=demo and not (pretrained or given(argv, "config_name"))), user,
        SMALL_DATA_DEFAULTS, from_scratch=not (pretrained or demo))
    resolve_finetuning_recipe(finetuning_args, training_args)
    check_model_ema(argv, finetuning_args)
    check_step_settings(argv, training_args)
    if training_args.push_to_hub and given(argv, "hub_strategy") and training_args.hub_strategy != "end":
        warnings.warn(f"--hub_strategy {training_args.hub_strategy}: hf_mim uploads once, at the end of the run "
                      "(model, processor, model card), with hf_mim.hub.publish.", stacklevel=2)
    return model_args, data_args, finetuning_args, training_args


def paper_recipe() -> dict:
    """MAE's main_finetune.py recipe: the options' own defaults, TRAINING_DEFAULTS and the default blr."""
    options = {field.name: field.default for field in dataclasses.fields(FinetuningArguments)
               if field.name in RECIPE_NAMES}
    training = {name: value for name, value in TRAINING_DEFAULTS.items() if name in RECIPE_NAMES}
    return {**options, **training, "base_learning_rate": DEFAULT_BASE_LEARNING_RATE}


def recipe_layers(demo: bool, demo_from_scratch: bool) -> tuple[tuple[str, dict], ...]:
    """The layers below the data-size rule: the paper's; the digits demo's, and its from-scratch model's (no
    --model_name_or_path nor --config_name)."""
    layers = [(PAPER, paper_recipe())]
    if demo:
        layers.append((DEMO, DEMO_DATA_DEFAULTS))
        if demo_from_scratch:
            layers.append((f"{DEMO}, from scratch", FROM_SCRATCH_DEFAULTS))
    return tuple(layers)


def resolve_finetuning_recipe(finetuning_args: FinetuningArguments, training_args, train_images: int | None = None
                              ) -> str:
    """The recipe in force (`hf_mim.recipe.RecipeInputs.resolve`: paper < digits demo < data-size rule <
    user), set on the two argument dataclasses; returns the line a run prints. An explicit --learning_rate
    wins over every base learning rate."""
    inputs = finetuning_args.recipe_inputs
    recipe = inputs.resolve(train_images)
    if "learning_rate" in inputs.user:
        recipe.pop("base_learning_rate")
        finetuning_args.base_learning_rate = None
    for name, setting in recipe.items():
        setattr(finetuning_args if hasattr(finetuning_args, name) else training_args, name, setting.value)
    return recipe_line(recipe)


__all__ = ["DataArguments", "FinetuningArguments", "ModelArguments", "add_aliases", "default_num_workers", "given",
           "parse_finetuning_args", "resolve_finetuning_recipe"]
