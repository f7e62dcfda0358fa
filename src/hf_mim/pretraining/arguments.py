"""Command line of `examples/pretrain.py`, with the argument names of transformers' and accelerate's
example scripts (see SCRIPT_CONVENTIONS) and their deprecated aliases (which warn)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings

from transformers import HfArgumentParser

from .methods import METHODS, get_method

DESCRIPTION = """\
Masked-image-modeling pre-training with Accelerate.

With no argument it pre-trains a tiny MAE on scikit-learn's handwritten digits (embedded, offline)
in a few minutes on a CPU and writes the model, its image processor, a model card, a log and a
reconstruction figure to outputs/pretrain-mae.
"""

EPILOG = """\
launch modes:
  python examples/pretrain.py                                   # one process (CPU or one GPU)
  accelerate launch examples/pretrain.py ...                    # your `accelerate config`
  accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/pretrain.py ...
  accelerate launch --multi_gpu --num_processes 8 examples/pretrain.py ...
  torchrun --nproc_per_node 8 examples/pretrain.py ...
  accelerate launch --config_file examples/accelerate_configs/multi_node.yaml --machine_rank R \\
      --main_process_ip HOST examples/pretrain.py ...

examples:
  # MAE ViT-B/16 on ImageNet-1k (the published recipe: 4096 images per step, blr 1.5e-4)
  accelerate launch examples/pretrain.py --dataset_name ILSVRC/imagenet-1k --config_name mae-base \\
      --norm_pix_loss --per_device_train_batch_size 512 --gradient_accumulation_steps 1 \\
      --num_train_epochs 800 --warmup_steps 0.05 --bf16 --output_dir outputs/mae-base
  # parquet files, resumed automatically from the newest checkpoint in --output_dir
  python examples/pretrain.py --train_file 'data/train-*.parquet' --validation_file data/val.parquet
"""

# Settings of the no-argument demo (no data source given) that differ from the general defaults.
DEMO_DEFAULTS = {"num_train_epochs": 25.0, "base_learning_rate": 6e-3, "eval_strategy": "steps",
                 "eval_steps": 100, "eval_on_start": True}
GENERAL_DEFAULTS = {"num_train_epochs": 3.0, "eval_strategy": "no", "eval_on_start": False, "lr_scheduler_type": "cosine",
                    # AdamW's usual settings, for a method whose recipe names no others
                    "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.05, "warmup_steps": 0}


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


class DeprecatedAlias(argparse.Action):
    """An old option name: stores into the new one's destination and warns."""

    def __init__(self, option_strings, dest, replacement: str, reason: str = "removed in transformers 5", **kwargs):
        self.replacement, self.reason = replacement, reason
        if kwargs.get("nargs") == 0:
            kwargs.setdefault("const", True)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated ({self.reason}); {self.replacement}.",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (one source; none = the embedded handwritten digits)")
    group.add_argument("--dataset_name", help="a Hub data set id, e.g. ILSVRC/imagenet-1k")
    group.add_argument("--dataset_config_name", help="the data set's configuration")
    group.add_argument("--train_dir", help="image folder (class sub-folders optional) for training")
    group.add_argument("--validation_dir", help="image folder for evaluation")
    group.add_argument("--train_file", help="parquet file(s) for training; globs allowed ('data/train-*.parquet')")
    group.add_argument("--validation_file", help="parquet file(s) for evaluation; globs allowed")
    group.add_argument("--cache_dir", help="where datasets and models are cached")
    group.add_argument("--token", help="Hub token for private data sets and models (default: HF_TOKEN / login)")
    group.add_argument("--streaming", action="store_true", help="stream the data set (needs --max_steps)")
    group.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="shuffle buffer when streaming")
    group.add_argument("--image_column_name", help="the image column (default: 'image', else 'img')")
    group.add_argument("--label_column_name", help="the label column (default: 'label' when present; optional)")
    group.add_argument("--train_val_split", type=float, default=0.15,
                       help="held-out fraction of train when there is no validation split (seeded by --data_seed)")
    group.add_argument("--max_train_samples", type=int, help="use only this many training images (seeded choice)")
    group.add_argument("--max_eval_samples", type=int, help="use only this many evaluation images")
    group.add_argument("--data_seed", type=int, help="seed of the split, the data order and augmentation (default: --seed)")


def add_model_arguments(parser: argparse.ArgumentParser, method_cls) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model_name_or_path", help="continue from these weights (a folder or Hub id)")
    group.add_argument("--config_name", help=f"a built-in architecture ({', '.join(method_cls.presets())}) or a "
                       "config folder / Hub id (default: the base preset; the demo preset for the digits)")
    group.add_argument("--model_type", help=f"the model type, checked against --method ({method_cls.config_class.model_type})")
    group.add_argument("--config_overrides", help='config fields, e.g. "hidden_size=192,num_hidden_layers=6"')
    group.add_argument("--image_processor_name", help="image processor folder / Hub id (default: the model's, or new)")
    group.add_argument("--model_revision", default="main", help="branch, tag or commit of Hub models")
    group.add_argument("--trust_remote_code", action="store_true", help="allow code from the Hub model repository")
    group.add_argument("--image_size", type=int, help="input resolution (default: the config's)")
    group.add_argument("--patch_size", type=int, help="patch size of a new model (default: the config's)")
    group.add_argument("--attn_implementation", choices=["sdpa", "eager", "flash_attention_2", "flex_attention"],
                       help="attention kernel (default: sdpa)")


def add_optimization_arguments(parser: argparse.ArgumentParser, method_cls) -> None:
    defaults = method_cls.defaults
    group = parser.add_argument_group("batch, learning rate and schedule")
    group.add_argument("--per_device_train_batch_size", type=int, default=64)
    group.add_argument("--per_device_eval_batch_size", type=int, default=64)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float,
                       help="absolute learning rate; when given it WINS over --base_learning_rate")
    group.add_argument("--base_learning_rate", "--blr", type=float,
                       help=f"lr = blr * (batch per device * processes * accumulation) / 256 "
                            f"(default: {defaults.get('base_learning_rate')}; {DEMO_DEFAULTS['base_learning_rate']} "
                            "for the digits demo)")
    group.add_argument("--weight_decay", type=float, help=f"AdamW weight decay, not on 1-D parameters, biases and "
                       f"token/position tables (default: {defaults.get('weight_decay')})")
    group.add_argument("--adam_beta1", type=float, help=f"(default: {defaults.get('adam_beta1')})")
    group.add_argument("--adam_beta2", type=float, help=f"(default: {defaults.get('adam_beta2')})")
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--num_train_epochs", type=float,
                       help=f"(default: {GENERAL_DEFAULTS['num_train_epochs']:g}; "
                            f"{DEMO_DEFAULTS['num_train_epochs']:g} for the digits demo)")
    group.add_argument("--max_steps", "--max_train_steps", type=int,
                       help="optimiser steps in all; overrides --num_train_epochs")
    group.add_argument("--lr_scheduler_type",
                       help="any transformers scheduler: cosine, linear, constant_with_warmup, cosine_with_min_lr ... "
                            f"(default: {defaults.get('lr_scheduler_type', GENERAL_DEFAULTS['lr_scheduler_type'])})")
    group.add_argument("--lr_scheduler_kwargs", type=json_dict,
                       help='JSON, e.g. \'{"min_lr": 1e-5}\' (default: the method\'s, with its default scheduler: '
                            f"{defaults.get('lr_scheduler_kwargs')})")
    group.add_argument("--warmup_steps", "--num_warmup_steps", type=warmup_type,
                       help=f"an int: steps; a float in [0, 1): a ratio of the run (default: {defaults.get('warmup_steps')})")
    group.add_argument("--warmup_ratio", dest="warmup_steps", type=warmup_type, action=DeprecatedAlias,
                       replacement="pass the ratio to --warmup_steps (a float in [0, 1))", help=argparse.SUPPRESS)
    group.add_argument("--max_grad_norm", type=float,
                       help=f"clip the gradient norm (default: {defaults.get('max_grad_norm')}; 0 = no clipping)")
    group.add_argument("--seed", type=int, default=42)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speed and precision (also `accelerate launch --mixed_precision/--dynamo_backend`)")
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    group.add_argument("--bf16", action="store_true", help="= --mixed_precision bf16")
    group.add_argument("--fp16", action="store_true", help="= --mixed_precision fp16")
    group.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    group.add_argument("--torch_compile", action="store_true", help="compile the model (inductor)")
    group.add_argument("--torch_compile_mode", help="default, reduce-overhead, max-autotune ...")
    group.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    group.add_argument("--dataloader_num_workers", type=int,
                       help="data-loading processes per training process (default: the CPU cores of the process - 1)")
    group.add_argument("--data_pipeline", choices=["auto", "fast", "reference"], default="auto",
                       help="fast: crop/flip/masks drawn in the workers, reduced JPEG decoding, uint8 to the device, "
                            "resize + flip + jitter + normalise batched there (same draws, pixels within 1-2 uint8 "
                            "levels); reference: torchvision on PIL images in the workers; auto (default): fast on "
                            "a GPU, reference on a CPU, where the batched resize costs more (see hf_mim.fast_data)")
    group.add_argument("--jpeg_decoding", choices=["auto", "device", "host"], default="auto",
                       help="fast pipeline: where JPEGs are decoded. device: the workers ship the files' bytes and the "
                            "training process decodes each batch on its device (nvJPEG on CUDA, batched); host: the "
                            "workers decode (at reduced scale where the crop allows); auto (default): device on CUDA")
    group.add_argument("--dataloader_pin_memory", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--dataloader_persistent_workers", action="store_true")


def add_checkpoint_arguments(parser: argparse.ArgumentParser, method_name: str) -> None:
    group = parser.add_argument_group("output, checkpoints and resume")
    group.add_argument("--output_dir", default=f"outputs/pretrain-{method_name}")
    group.add_argument("--checkpointing_steps", "--save_steps", type=checkpointing_type, default=500,
                       help="save a checkpoint-<step> every N optimiser steps, or at each 'epoch' end, or 'no'")
    group.add_argument("--save_total_limit", type=int, default=2, help="keep this many newest checkpoints (0: all)")
    group.add_argument("--resume_from_checkpoint",
                       help="a checkpoint-<step> folder, 'latest', or 'none' (default: the newest in --output_dir)")
    group.add_argument("--overwrite_output_dir", action=DeprecatedAlias, nargs=0, default=False,
                       replacement="use --resume_from_checkpoint none to start afresh in an existing --output_dir",
                       help=argparse.SUPPRESS)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation, logging and tracking")
    group.add_argument("--do_train", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--do_eval", action=argparse.BooleanOptionalAction,
                       help="masked-patch loss on held-out images with fixed masks (default: when there are some)")
    group.add_argument("--eval_strategy", choices=["no", "steps", "epoch"],
                       help="evaluate during training (default: 'steps' when --eval_steps is given, else 'no'; "
                            "a final evaluation runs with --do_eval)")
    group.add_argument("--evaluation_strategy", dest="eval_strategy", action=DeprecatedAlias,
                       replacement="use --eval_strategy", help=argparse.SUPPRESS)
    group.add_argument("--eval_steps", type=int, help="evaluate every N optimiser steps")
    group.add_argument("--eval_on_start", action=argparse.BooleanOptionalAction, default=None,
                       help="evaluate before the first step (the baseline of the loss curve)")
    group.add_argument("--logging_steps", type=int, default=10, help="log the loss every N optimiser steps")
    group.add_argument("--report_to", nargs="+", default=["auto"],
                       help="trackers besides log.jsonl: tensorboard, wandb, ..., 'all', 'none' (default: tensorboard "
                            "when installed)")
    group.add_argument("--with_tracking", action="store_true", help="= --report_to all")
    group.add_argument("--run_name", help="tracker run name (default: the output folder's name)")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true", help="upload the final model, processor and card")
    group.add_argument("--hub_model_id", help="NAMESPACE/NAME of the repository")
    group.add_argument("--push_to_hub_model_id", dest="hub_model_id", action=DeprecatedAlias,
                       replacement="use --hub_model_id", help=argparse.SUPPRESS)
    group.add_argument("--hub_token", help="default: HF_TOKEN / the `hf auth login` token")
    group.add_argument("--hub_private_repo", action="store_true")
    group.add_argument("--hub_revision", help="branch to push to")
    group.add_argument("--hub_strategy", choices=["end"], default="end",
                       help="only 'end' (upload once the run is done) is supported")


def add_method_options(parser: HfArgumentParser, method_cls) -> None:
    """The method's own options: its typed dataclass (`options_class`), one spelling per option across the
    scripts; renamed options stay as deprecated aliases."""
    parser._add_dataclass_arguments(method_cls.options_class)
    optional_flags = [field.name for field in dataclasses.fields(method_cls.options_class)
                      if field.default is None and field.type in ("bool | None", bool | None)]
    for action in parser._actions:
        if action.dest in optional_flags:  # None = the config's; `--flag` alone = True, `--no-flag` = False
            action.nargs, action.const = "?", True
    for name in optional_flags:
        parser.add_argument(f"--no-{name}", f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
    if any(field == "crop_min_scale" for field in method_cls.options_class.__dataclass_fields__):
        parser.add_argument("--min_crop_scale", dest="crop_min_scale", type=float, action=DeprecatedAlias,
                            replacement="use --crop_min_scale", reason="renamed: one spelling in every script",
                            help=argparse.SUPPRESS)


def build_parser(method_name: str = "mae") -> argparse.ArgumentParser:
    method_cls = get_method(method_name)
    parser = HfArgumentParser(
        [], prog="pretrain.py", description=f"{DESCRIPTION}\n--method {method_name}: {method_cls.summary}",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("method")
    group.add_argument("--method", default="mae", choices=sorted(METHODS),
                       help="the MIM method; `--method NAME --help` lists its own options")
    add_data_arguments(parser)
    add_model_arguments(parser, method_cls)
    add_method_options(parser, method_cls)
    add_optimization_arguments(parser, method_cls)
    add_speed_arguments(parser)
    add_checkpoint_arguments(parser, method_name)
    add_evaluation_arguments(parser)
    add_hub_arguments(parser)
    return parser


def is_demo(args: argparse.Namespace) -> bool:
    """No data source given: the embedded digits."""
    return not any((args.dataset_name, args.train_dir, args.validation_dir, args.train_file, args.validation_file))


def fill_defaults(args: argparse.Namespace, method_cls=None) -> argparse.Namespace:
    """Defaults that depend on the method (`method_cls`, default: `--method` in METHODS), on the demo, and
    on other arguments. Only options still None are filled."""
    if args.eval_strategy is None and args.eval_steps:
        args.eval_strategy = "steps"
    method_defaults = dict((method_cls or get_method(args.method)).defaults)
    if args.lr_scheduler_type is not None:  # the method's scheduler arguments belong to the method's scheduler
        method_defaults.pop("lr_scheduler_kwargs", None)
    # general < the method's recipe < the digits demo
    for key, value in {**GENERAL_DEFAULTS, **method_defaults, **(DEMO_DEFAULTS if is_demo(args) else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.max_grad_norm = args.max_grad_norm or None  # 0 = no clipping
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    args.run_name = args.run_name or os.path.basename(os.path.normpath(args.output_dir))
    if args.with_tracking:
        args.report_to = ["all"]
    return args


def resolve_mixed_precision(args: argparse.Namespace) -> str | None:
    chosen = {name for name, flag in (("bf16", args.bf16), ("fp16", args.fp16)) if flag}
    if args.mixed_precision:
        chosen.add(args.mixed_precision)
    if len(chosen) > 1:
        raise ValueError(f"Conflicting precision options {sorted(chosen)}: pick one of --bf16, --fp16, --mixed_precision.")
    return chosen.pop() if chosen else None


def check_arguments(args: argparse.Namespace) -> None:
    if args.streaming and not args.max_steps:
        raise ValueError("A streamed data set has no length: pass --max_steps.")
    if args.eval_strategy == "steps" and not args.eval_steps:
        raise ValueError("--eval_strategy steps needs --eval_steps N.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id NAMESPACE/NAME.")
    if args.push_to_hub:
        check_hub_token(args.hub_token, args.hub_model_id)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    resolve_mixed_precision(args)


def check_hub_token(token: str | None, repo_id: str) -> None:
    """Fail before training, not after it, when the final upload could not happen."""
    from huggingface_hub import get_token

    from ..hub import TOKEN_HELP

    if not (token or get_token()):
        raise ValueError(f"--push_to_hub: no Hugging Face token to upload {repo_id} with: {TOKEN_HELP}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Two passes: `--method` first, then the full parser with that method's options."""
    method_parser = argparse.ArgumentParser(add_help=False)
    method_parser.add_argument("--method", default="mae")
    known, _ = method_parser.parse_known_args(argv)
    get_method(known.method)  # a clear error for an unknown method
    args = build_parser(known.method).parse_args(argv)
    args = fill_defaults(args)
    check_arguments(args)
    get_method(args.method).options_from(args)  # validates the method's options now
    return args


__all__ = ["DEMO_DEFAULTS", "build_parser", "is_demo", "parse_args", "resolve_mixed_precision"]
