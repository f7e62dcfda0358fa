"""What the scripts' command lines share: `option()` (a dataclass field with its `--help`), the parser
(`HfArgumentParser` with one set of spelling rules for every script), documented and deprecated aliases,
and the data-source options of every script.

Spelling rules, the same in `pretrain.py`, `train_tokenizer.py`, `finetune.py`, `segment.py`, `probe.py` and
`publish.py`:
every option takes `--a_b` and `--a-b`; a flag whose default is not False also takes `--no_a_b`,
`--no-a_b` and `--no-a-b`; an option users know under another name (`--max_train_steps`) is an alias
listed in `--help`; an unknown or abbreviated option is an error that names the closest options.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import warnings

from transformers import HfArgumentParser


def option(default=None, help: str = "", **metadata):
    """A field of an options dataclass, with its `--help` text. Metadata: `aliases` (other option
    strings), `choices`, and `type`: a parsing function used instead of the annotation's type
    (`"10"` -> 10 steps, `"0.05"` -> a ratio). A list default is copied for every instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def spellings(option_string: str) -> list[str]:
    """`--a_b` -> [`--a_b`, `--a-b`]; `--no_a_b` also -> `--no-a_b` (argparse's BooleanOptionalAction)."""
    variants = [option_string, option_string.replace("_", "-")]
    if option_string.startswith("--no_"):
        variants.append("--no-" + option_string[len("--no_"):])
    return list(dict.fromkeys(variants))


class DeprecatedAlias(argparse.Action):
    """An old option name: stores into the new one's destination and warns."""

    def __init__(self, option_strings, dest, replacement: str, reason: str = "removed in transformers 5", **kwargs):
        self.replacement, self.reason = replacement, reason
        if kwargs.get("nargs") == 0:
            kwargs.setdefault("const", True)
        kwargs.setdefault("help", f"deprecated ({reason}): {replacement}")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated ({self.reason}); {self.replacement}.",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


class MimArgumentParser(HfArgumentParser):
    """`HfArgumentParser` with the spelling rules above. Abbreviations are refused: `--learning_r`
    silently meaning `--learning_rate` also hides which options a user gave (see `given`)."""

    def __init__(self, dataclass_types=(), **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        self.deprecated_group = None
        self.aliases_without_default: list[argparse.Action] = []
        super().__init__(dataclass_types, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        if "type" in field.metadata:  # a parsing function beside the annotation (which documents the values)
            field = copy.copy(field)
            field.type = field.metadata["type"]
        HfArgumentParser._parse_dataclass_field(parser, field)
        if field.type == bool | None and field.default is None:  # None: "not given" (the config's or the recipe's)
            flag = parser._option_string_actions[f"--{field.name}"]
            flag.nargs, flag.const = "?", True  # `--flag` alone = True
            parser.add_argument(f"--no_{field.name}", dest=field.name, action="store_false",
                                help=f"= --{field.name} false")

    def _add_dataclass_arguments(self, dtype) -> None:
        super()._add_dataclass_arguments(dtype)
        for name, text in getattr(dtype, "_help_overrides", {}).items():  # a shared field, worded for this script
            set_help(self, name, text)

    def add_alias(self, names: list[str], dest: str, help: str, **kwargs) -> argparse.Action:
        """Another name of `dest`'s option, listed in --help (`help`, e.g. "alias of --max_steps"). Its default
        is the option's own (the first action of a destination sets it)."""
        kwargs.setdefault("default", argparse.SUPPRESS)
        return self.remember_alias(self.add_argument(*names, dest=dest, help=help, **kwargs))

    def add_deprecated_alias(self, name: str, dest: str, replacement: str, **kwargs) -> argparse.Action:
        """An old name that still works, with a FutureWarning and a --help line naming the new one."""
        if self.deprecated_group is None:
            self.deprecated_group = self.add_argument_group("deprecated names (they still work, with a warning)")
        return self.remember_alias(self.deprecated_group.add_argument(
            name, dest=dest, action=DeprecatedAlias, replacement=replacement, **kwargs))

    def remember_alias(self, action: argparse.Action) -> argparse.Action:
        if action.default is argparse.SUPPRESS:  # the option it stands for gives the default
            self.aliases_without_default.append(action)
        return action

    def set_defaults(self, **kwargs) -> None:
        """As argparse's, but an alias keeps showing no default of its own in --help."""
        super().set_defaults(**kwargs)
        for action in self.aliases_without_default:
            action.default = argparse.SUPPRESS

    def add_other_spellings(self) -> None:
        """Give every option all its spellings (idempotent; called before parsing and --help)."""
        for action in self._actions:
            for option_string in list(action.option_strings):
                for variant in spellings(option_string):
                    if variant not in self._option_string_actions:
                        action.option_strings.append(variant)
                        self._option_string_actions[variant] = action

    def option_names(self) -> list[str]:
        return sorted({name for action in self._actions for name in action.option_strings if name.startswith("--")})

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, except that an unknown option is an error (with the closest names): every script
        parses its whole command line, so an option left over is always a mistake."""
        self.add_other_spellings()
        namespace, remaining = super().parse_known_args(args, namespace)
        unknown = [arg.split("=", 1)[0] for arg in remaining if arg.startswith("--")]
        if unknown:
            self.error(self.unknown_options_message(unknown))
        return namespace, remaining

    def unknown_options_message(self, unknown: list[str]) -> str:
        known = [name for name in self.option_names() if "-" not in name[2:]]  # one spelling each
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(name.replace("-", "_"), known, n=3, cutoff=0.6)
            lines.append(f"{name} (did you mean {' or '.join(close)}?)" if close else name)
        return f"unrecognized arguments: {', '.join(lines)}; see --help"

    def format_help(self) -> str:
        self.add_other_spellings()
        return super().format_help()


def add_transformers4_names(parser: MimArgumentParser, warmup_type=float) -> None:
    """Names removed in transformers 5 that their READMEs still show: they work, with a FutureWarning
    (`warmup_type` parses the ratio as the script's --warmup_steps does)."""
    for old, dest, kind, replacement in (
        ("--warmup_ratio", "warmup_steps", warmup_type, "pass the ratio to --warmup_steps (a float in [0, 1))"),
        ("--evaluation_strategy", "eval_strategy", str, "use --eval_strategy"),
        ("--push_to_hub_model_id", "hub_model_id", str, "use --hub_model_id"),
    ):
        parser.add_deprecated_alias(old, dest, type=kind, replacement=replacement, default=argparse.SUPPRESS)
    parser.add_deprecated_alias("--overwrite_output_dir", "resume_from_checkpoint", nargs=0, const="none",
                                replacement="use --resume_from_checkpoint none to start afresh in an existing "
                                            "--output_dir", default=argparse.SUPPRESS)


def set_help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Replace the --help text of `dest`'s option (not of its aliases)."""
    for action in parser._actions:
        if action.dest == dest and not isinstance(action, DeprecatedAlias) and action.help is not argparse.SUPPRESS:
            action.help = text
            return


def append_help(parser: argparse.ArgumentParser, notes: dict[str, str]) -> None:
    """Append "(note)" to the --help of each option in `notes` (e.g. defaults that depend on the method)."""
    for action in parser._actions:
        if action.dest in notes and action.option_strings and action.option_strings[0] == f"--{action.dest}":
            action.help = f"{action.help or ''} ({notes[action.dest]})".strip()


def peek_method(argv: list[str], default: str) -> str:
    """The value of `--method` (it decides which options the parser has), before parsing: the last one
    given, as argparse keeps."""
    method = default
    for index, arg in enumerate(argv):
        if arg == "--method" and index + 1 < len(argv):
            method = argv[index + 1]
        elif arg.startswith("--method="):
            method = arg.split("=", 1)[1]
    return method


def given(argv: list[str], name: str) -> bool:
    """Whether `--name` (in either spelling) is on the command line, to tell an explicit value from a default."""
    return any(arg.split("=", 1)[0].replace("-", "_") == f"__{name}" for arg in argv)


@dataclasses.dataclass
class DataSourceArguments:
    """One data source (none: the script's embedded demo data), its columns and its size: the same options
    in every script. A subclass words a field's --help for its script in `_help_overrides` ({name: text})."""

    dataset_name: str | None = option(help="a Hub data set id, e.g. ILSVRC/imagenet-1k")
    dataset_config_name: str | None = option(help="the data set's configuration")
    train_dir: str | None = option(help="image folder for training")
    validation_dir: str | None = option(help="image folder for evaluation")
    train_file: str | None = option(help="parquet file(s) for training; globs allowed ('data/train-*.parquet')")
    validation_file: str | None = option(help="parquet file(s) for evaluation; globs allowed")
    image_column_name: str | None = option(help="the image column (default: 'image', else 'img')")
    train_val_split: float = option(0.15, help="held-out fraction of train when there is no validation split")
    max_train_samples: int | None = option(help="use only this many training images (seeded choice)")
    max_eval_samples: int | None = option(help="use only this many evaluation images")

    @property
    def is_demo(self) -> bool:
        """No data source given: the embedded demo data."""
        return not any(getattr(self, name) for name in DATA_SOURCES)


DATA_SOURCES = ("dataset_name", "train_dir", "validation_dir", "train_file", "validation_file")

__all__ = ["DATA_SOURCES", "DataSourceArguments", "DeprecatedAlias", "MimArgumentParser", "add_transformers4_names",
           "append_help", "given", "option", "peek_method", "set_help", "spellings"]
