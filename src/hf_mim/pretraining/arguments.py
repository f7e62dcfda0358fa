"""Command line of `examples/pretrain.py`: the option groups of `options.py` and the method's own options
dataclass, parsed by one `MimArgumentParser`; the defaults that depend on the method or the demo; the
checks that fail before training."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..cli import MimArgumentParser, add_transformers4_names, append_help, option, peek_method
from ..recipe import DEMO, PAPER, SMALL_DATA_MAX_IMAGES, USER, RecipeInputs, Setting, recipe_line
from .methods import METHODS, get_method
from .options import LEADING_GROUPS, TRAINING_GROUPS, warmup_type

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


@dataclasses.dataclass
class MethodArguments:
    _argument_group_name = "method"
    method: str = option("mae", help="the MIM method; `--method NAME --help` lists its own options")


def recipe_notes(method_cls) -> dict[str, str]:
    """What --help adds to the options whose default is the method's recipe (or depends on the method)."""
    defaults = {**GENERAL_DEFAULTS, **method_cls.defaults}  # as fill_defaults applies them, outside the demo
    notes = {name: f"default: {defaults.get(name)}" for name in (
        "weight_decay", "adam_beta1", "adam_beta2", "lr_scheduler_kwargs", "warmup_steps", "lr_scheduler_type",
        "max_grad_norm")}
    return {**notes,
            "base_learning_rate": f"default: {defaults.get('base_learning_rate')} (the paper's); "
                                  f"{DEMO_DEFAULTS['base_learning_rate']} for the digits demo and from scratch on "
                                  f"fewer than {SMALL_DATA_MAX_IMAGES:,} images (the start of a run prints the recipe "
                                  "in force and where each value came from)",
            "num_train_epochs": f"default: {defaults['num_train_epochs']:g}; "
                                f"{DEMO_DEFAULTS['num_train_epochs']:g} for the digits demo",
            "config_name": f"built-in: {', '.join(method_cls.presets())}",
            "model_type": f"--method {method_cls.name}: {method_cls.config_class.model_type}"}


def script_parser(method_cls, method_arguments: type, methods, **kwargs) -> MimArgumentParser:
    """ONE parser for a training script: its `--method` (`method_arguments`, choices: the registry `methods`
    now), the shared option groups and the method's own options dataclass (`options_class`), with the
    method's recipe in --help."""
    parser = MimArgumentParser(
        (method_arguments, *LEADING_GROUPS, method_cls.options_class, *TRAINING_GROUPS),
        formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs,
    )
    parser._option_string_actions["--method"].choices = sorted(methods)
    add_transformers4_names(parser, warmup_type=warmup_type)
    if "crop_min_scale" in method_cls.options_class.__dataclass_fields__:
        parser.add_deprecated_alias("--min_crop_scale", "crop_min_scale", type=float,
                                    replacement="use --crop_min_scale", reason="renamed: one spelling in every script")
    append_help(parser, recipe_notes(method_cls))
    return parser


def build_parser(method_name: str = "mae") -> MimArgumentParser:
    method_cls = get_method(method_name)
    parser = script_parser(method_cls, MethodArguments, METHODS, prog="pretrain.py", epilog=EPILOG,
                           description=f"{DESCRIPTION}\n--method {method_name}: {method_cls.summary}")
    parser.set_defaults(output_dir=f"outputs/pretrain-{method_name}")
    return parser


def parse_into_namespace(parser: MimArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Every option group's dataclass (each validates its own fields), flattened into the one namespace the
    training loop and the methods read."""
    groups = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return argparse.Namespace(**{name: value for group in groups for name, value in vars(group).items()})


def is_demo(args: argparse.Namespace) -> bool:
    """No data source given: the embedded digits."""
    return not any((args.dataset_name, args.train_dir, args.validation_dir, args.train_file, args.validation_file))


def recipe_layers(args: argparse.Namespace, method_cls) -> tuple[tuple[str, dict], ...]:
    """The recipe's layers below the data-size rule: the general defaults and the method's (the paper's)
    recipe, then the digits demo's settings, and the method's own demo settings over them (a tokenizer's
    `demo_defaults`)."""
    method_defaults = dict(method_cls.defaults)
    if args.lr_scheduler_type is not None:  # the method's scheduler arguments belong to the method's scheduler
        method_defaults.pop("lr_scheduler_kwargs", None)
    layers = [(PAPER, {**GENERAL_DEFAULTS, **method_defaults})]
    if is_demo(args):
        layers.append((DEMO, DEMO_DEFAULTS))
        if getattr(method_cls, "demo_defaults", None):
            layers.append((DEMO, method_cls.demo_defaults))
    return tuple(layers)


def fill_defaults(args: argparse.Namespace, method_cls=None) -> argparse.Namespace:
    """Defaults that depend on the method (`method_cls`, default: `--method` in METHODS), on the demo, and
    on other arguments. Only options still None are filled: what is set is the user's. The recipe's inputs
    are kept in `args.recipe_inputs`; `apply_data_size_rule` completes the recipe once the data is known."""
    if args.eval_strategy is None and args.eval_steps:
        args.eval_strategy = "steps"
    method_cls = method_cls or get_method(args.method)
    layers = recipe_layers(args, method_cls)
    names = {name for _, values in layers for name in values}
    user = {name: getattr(args, name) for name in sorted(names) if getattr(args, name, None) is not None}
    args.recipe_inputs = RecipeInputs(layers, user, small_data_values(method_cls),
                                      from_scratch=not (args.model_name_or_path or is_demo(args)))
    set_recipe(args, args.recipe_inputs.resolve())
    args.max_grad_norm = args.max_grad_norm or None  # 0 = no clipping
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    args.run_name = args.run_name or os.path.basename(os.path.normpath(args.output_dir))
    if args.with_tracking:
        args.report_to = ["all"]
    return args


def small_data_values(method_cls) -> dict:
    """The data-size rule's recipe: the learning rate the method's digits demo learns with (the paper's
    ImageNet one, e.g. MAE's blr 1.5e-4, barely moves a small model on a small set)."""
    demo = getattr(method_cls, "demo_defaults", None) or DEMO_DEFAULTS  # a tokenizer has its own demo
    return {"base_learning_rate": demo["base_learning_rate"]}


def set_recipe(args: argparse.Namespace, recipe: dict) -> dict:
    """Sets the recipe's values on `args`; returns the recipe as the run reports it."""
    for name, setting in recipe.items():
        setattr(args, name, setting.value)
    if args.learning_rate is not None:  # an absolute learning rate wins over every base learning rate
        recipe = {name: setting for name, setting in recipe.items() if name != "base_learning_rate"}
        recipe["learning_rate"] = Setting(args.learning_rate, USER)
    return recipe


def apply_data_size_rule(args: argparse.Namespace, train_images: int | None) -> str:
    """Once the training set's size is known: the data-size rule's layer over the parse-time ones (a
    from-scratch run, no --model_name_or_path, on small data), the user's values still winning. Returns
    the recipe line the run prints. A namespace built without `fill_defaults` is left as it is."""
    if not hasattr(args, "recipe_inputs"):
        return "Recipe in force: the arguments as given (no defaults were resolved)."
    return recipe_line(set_recipe(args, args.recipe_inputs.resolve(train_images)))


def resolve_mixed_precision(args: argparse.Namespace) -> str | None:
    chosen = {name for name, flag in (("bf16", args.bf16), ("fp16", args.fp16)) if flag}
    if args.mixed_precision:
        chosen.add(args.mixed_precision)
    if len(chosen) > 1:
        raise ValueError(f"Conflicting precision options {sorted(chosen)}: pick one of --bf16, --fp16, --mixed_precision.")
    return chosen.pop() if chosen else None


def check_arguments(args: argparse.Namespace) -> None:
    """Checks across option groups (each group's dataclass checks its own fields)."""
    if args.streaming and not args.max_steps:
        raise ValueError("A streamed data set has no length: pass --max_steps.")
    if args.eval_strategy == "steps" and not args.eval_steps:
        raise ValueError("--eval_strategy steps needs --eval_steps N.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id NAMESPACE/NAME.")
    if args.push_to_hub:
        check_hub_token(args.hub_token, args.hub_model_id)
    resolve_mixed_precision(args)


def check_hub_token(token: str | None, repo_id: str) -> None:
    """Fail before training, not after it, when the final upload could not happen."""
    from huggingface_hub import get_token

    from ..hub import TOKEN_HELP

    if not (token or get_token()):
        raise ValueError(f"--push_to_hub: no Hugging Face token to upload {repo_id} with: {TOKEN_HELP}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`--method` decides the parser's options; then one parse, the method's defaults, and the checks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    method_cls = get_method(peek_method(argv, "mae"))  # a clear error for an unknown method
    args = fill_defaults(parse_into_namespace(build_parser(method_cls.name), argv))
    check_arguments(args)
    method_cls.options_from(args)  # validates the method's options now
    return args


__all__ = ["DEMO_DEFAULTS", "MethodArguments", "apply_data_size_rule", "build_parser", "is_demo", "parse_args",
           "parse_into_namespace", "resolve_mixed_precision", "script_parser"]
