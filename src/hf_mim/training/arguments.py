"""The command line of the training engine (`pretrain.py`, `train_tokenizer.py`), one way through:

    argv -> `--method` (it decides the options) -> ONE parser: the shared groups of `options.py` and the
    method's own options dataclass -> the typed groups, each checking its own fields -> `resolve`: the
    defaults that depend on the method, the digits demo and other options (the recipe's layers) -> `check`:
    what spans groups -> read-only `Options`.

Nothing rewrites the options afterwards: the one part of the recipe that needs the data (the data-size
rule) makes new options (`with_data_size_rule`), and what a run decides for itself (data-loader workers,
whether to evaluate, the model preset) belongs to the run. A script is a `Script`: its texts, its method
registry and its defaults over the shared ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

from ..cli import MimArgumentParser, add_transformers4_names, append_help, peek_method, set_help
from ..recipe import DEMO, PAPER, SMALL_DATA_MAX_IMAGES, USER, RecipeInputs, Setting, recipe_line
from .method import MethodRegistry
from .options import LEADING_GROUPS, TRAINING_GROUPS, warmup_type

# Settings of the no-argument demo (no data source given) that differ from the general defaults; a
# tokenizer's `demo_defaults` go over them.
DEMO_DEFAULTS = {"num_train_epochs": 25.0, "base_learning_rate": 6e-3, "eval_strategy": "steps",
                 "eval_steps": 100, "eval_on_start": True}
GENERAL_DEFAULTS = {"num_train_epochs": 3.0, "eval_strategy": "no", "eval_on_start": False, "lr_scheduler_type": "cosine",
                    # AdamW's usual settings, for a method whose recipe names no others
                    "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.05, "warmup_steps": 0}


class Options(argparse.Namespace):
    """A run's options, read-only once parsed and resolved: a later stage makes new ones with `replace`
    (an attribute set after parsing raises, so no stage can change what an earlier one read)."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"the options are read-only once parsed: make new ones with .replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the options are read-only once parsed ({name!r} cannot be deleted)")

    def replace(self, **changes) -> Options:
        return Options(**{**vars(self), **changes})


@dataclasses.dataclass(frozen=True)
class Script:
    """What sets one training script's command line apart: its name and texts, its `--method` group and
    method registry, and its parser defaults and help texts over the shared ones."""

    prog: str
    method_arguments: type  # the dataclass of `--method` (its default and help)
    methods: MethodRegistry
    describe: Callable[[type], str]  # method class -> the --help description
    epilog: str
    output_dir: str  # the default, formatted with the method's name
    parser_defaults: dict = dataclasses.field(default_factory=dict)
    help_overrides: dict = dataclasses.field(default_factory=dict)  # shared options' help that would mislead here

    @property
    def default_method(self) -> str:
        return self.method_arguments.method


# -- the parser ---------------------------------------------------------------------------------------


def recipe_notes(method_cls) -> dict[str, str]:
    """What --help adds to the options whose default is the method's recipe (or depends on the method)."""
    defaults = {**GENERAL_DEFAULTS, **method_cls.defaults}  # as `resolve` applies them, outside the demo
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


def build_parser(script: Script, method_name: str | None = None) -> MimArgumentParser:
    """ONE parser: the script's `--method` (choices: its registry), the shared option groups and the
    method's own options dataclass, with the method's recipe in --help."""
    method_cls = script.methods.lookup(method_name or script.default_method)
    parser = MimArgumentParser(
        (script.method_arguments, *LEADING_GROUPS, method_cls.options_class, *TRAINING_GROUPS),
        prog=script.prog, description=script.describe(method_cls), epilog=script.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser._option_string_actions["--method"].choices = sorted(script.methods)
    add_transformers4_names(parser, warmup_type=warmup_type)
    if "crop_min_scale" in method_cls.options_class.__dataclass_fields__:
        parser.add_deprecated_alias("--min_crop_scale", "crop_min_scale", type=float,
                                    replacement="use --crop_min_scale", reason="renamed: one spelling in every script")
    append_help(parser, recipe_notes(method_cls))
    for dest, text in script.help_overrides.items():
        set_help(parser, dest, text)
    parser.set_defaults(output_dir=script.output_dir.format(method=method_cls.name), **script.parser_defaults)
    return parser


def parse_options(script: Script, argv: list[str] | None = None) -> Options:
    """`--method` decides the parser's options; then one parse, `resolve` and `check`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    method_cls = script.methods.lookup(peek_method(argv, script.default_method))  # names the choices if unknown
    groups = build_parser(script, method_cls.name).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    options = resolve(Options(**{name: value for group in groups for name, value in vars(group).items()}), method_cls)
    check(options, method_cls)
    return options


# -- the defaults that depend on the method, the demo and other options ----------------------------------


def is_demo(options) -> bool:
    """No data source given: the embedded digits."""
    return not any((options.dataset_name, options.train_dir, options.validation_dir, options.train_file,
                    options.validation_file))


def recipe_layers(options, method_cls) -> tuple[tuple[str, dict], ...]:
    """The recipe's layers below the data-size rule: the general defaults and the method's (the paper's)
    recipe, then the digits demo's settings, and the method's own demo settings over them (a tokenizer's
    `demo_defaults`)."""
    method_defaults = dict(method_cls.defaults)
    if options.lr_scheduler_type is not None:  # the method's scheduler arguments belong to the method's scheduler
        method_defaults.pop("lr_scheduler_kwargs", None)
    layers = [(PAPER, {**GENERAL_DEFAULTS, **method_defaults})]
    if is_demo(options):
        layers.append((DEMO, DEMO_DEFAULTS))
        if getattr(method_cls, "demo_defaults", None):
            layers.append((DEMO, method_cls.demo_defaults))
    return tuple(layers)


def small_data_values(method_cls) -> dict:
    """The data-size rule's recipe: the learning rate the method's digits demo learns with (the paper's
    ImageNet one, e.g. MAE's blr 1.5e-4, barely moves a small model on a small set)."""
    demo = getattr(method_cls, "demo_defaults", None) or DEMO_DEFAULTS  # a tokenizer has its own demo
    return {"base_learning_rate": demo["base_learning_rate"]}


def resolve(parsed: Options, method_cls) -> Options:
    """The options as parsed (what is not None is the user's) with every default that depends on the
    method, the demo or other options. The recipe's inputs are kept in `recipe_inputs` for
    `with_data_size_rule`, which completes the recipe once the data is known."""
    options = parsed.replace(eval_strategy="steps" if parsed.eval_strategy is None and parsed.eval_steps
                             else parsed.eval_strategy)
    layers = recipe_layers(options, method_cls)
    names = {name for _, values in layers for name in values}
    user = {name: getattr(options, name) for name in sorted(names) if getattr(options, name, None) is not None}
    inputs = RecipeInputs(layers, user, small_data_values(method_cls),
                          from_scratch=not (options.model_name_or_path or is_demo(options)))
    options = options.replace(recipe_inputs=inputs, **recipe_values(inputs.resolve()))
    return options.replace(
        max_grad_norm=options.max_grad_norm or None,  # 0 = no clipping
        data_seed=options.seed if options.data_seed is None else options.data_seed,
        run_name=options.run_name or os.path.basename(os.path.normpath(options.output_dir)),
        report_to=["all"] if options.with_tracking else options.report_to,
    )


def recipe_values(recipe: dict[str, Setting]) -> dict:
    return {name: setting.value for name, setting in recipe.items()}


def with_data_size_rule(options, train_images: int | None) -> tuple[Options, str]:
    """Once the training set's size is known: new options with the data-size rule's layer over the parse-time
    ones (a from-scratch run, no --model_name_or_path, on small data), the user's values still winning; and the
    recipe line the run prints."""
    recipe = options.recipe_inputs.resolve(train_images)
    options = options.replace(**recipe_values(recipe))
    if options.learning_rate is not None:  # an absolute learning rate wins over every base learning rate
        recipe = {name: setting for name, setting in recipe.items() if name != "base_learning_rate"}
        recipe["learning_rate"] = Setting(options.learning_rate, USER)
    return options, recipe_line(recipe)


# -- checks across option groups (each group's dataclass checks its own fields) ------------------------


def resolve_mixed_precision(options) -> str | None:
    chosen = {name for name, flag in (("bf16", options.bf16), ("fp16", options.fp16)) if flag}
    if options.mixed_precision:
        chosen.add(options.mixed_precision)
    if len(chosen) > 1:
        raise ValueError(f"Conflicting precision options {sorted(chosen)}: pick one of --bf16, --fp16, --mixed_precision.")
    return chosen.pop() if chosen else None


def check(options: Options, method_cls) -> None:
    if options.streaming and not options.max_steps:
        raise ValueError("A streamed data set has no length: pass --max_steps.")
    if options.eval_strategy == "steps" and not options.eval_steps:
        raise ValueError("--eval_strategy steps needs --eval_steps N.")
    if options.push_to_hub and not options.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id NAMESPACE/NAME.")
    if options.push_to_hub:
        check_hub_token(options.hub_token, options.hub_model_id)
    resolve_mixed_precision(options)
    method_cls.options_from(options)  # the method's own options, checked now rather than after loading data


def check_hub_token(token: str | None, repo_id: str) -> None:
    """Fail before training, not after it, when the final upload could not happen."""
    from huggingface_hub import get_token

    from ..hub import TOKEN_HELP

    if not (token or get_token()):
        raise ValueError(f"--push_to_hub: no Hugging Face token to upload {repo_id} with: {TOKEN_HELP}.")


__all__ = ["DEMO_DEFAULTS", "GENERAL_DEFAULTS", "Options", "Script", "build_parser", "is_demo", "parse_options",
           "resolve", "resolve_mixed_precision", "with_data_size_rule"]
