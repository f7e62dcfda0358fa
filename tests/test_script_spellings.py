"""One spelling per option across `pretrain.py`, `train_tokenizer.py`, `finetune.py` and `segment.py`: the
synonyms users bring from other scripts mean the same everywhere, a renamed option warns in every script that
had it, and the spelling rules of `hf_mim.cli` (both spellings, aliases in --help, close matches) hold in all."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from hf_mim.finetuning.arguments import parse_finetuning_args
from hf_mim.pretraining.arguments import parse_args as parse_pretraining_args
from hf_mim.tokenizer_training.arguments import parse_args as parse_tokenizer_args


def pretraining(argv):
    args = parse_pretraining_args(argv)
    return args.warmup_steps, args.max_steps


def tokenizer(argv):
    args = parse_tokenizer_args(argv)
    return args.warmup_steps, args.max_steps


def finetuning(argv):
    training = parse_finetuning_args(argv + ["--output_dir", "x"])[3]
    return training.warmup_steps, training.max_steps


SCRIPTS = {"pretrain": pretraining, "train_tokenizer": tokenizer, "finetune": finetuning}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_accelerate_scripts_names_are_quiet_synonyms(script):
    """--num_warmup_steps / --max_train_steps (run_mim_no_trainer.py's) are the same options, in every script."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SCRIPTS[script](["--num_warmup_steps", "7", "--max_train_steps", "9"]) == (7, 9)


@pytest.mark.parametrize("script", SCRIPTS)
def test_warmup_ratio_warns_and_lands_in_warmup_steps_in_every_script(script):
    with pytest.warns(FutureWarning, match="--warmup_ratio is deprecated"):
        assert SCRIPTS[script](["--warmup_ratio", "0.1"])[0] == 0.1


@pytest.mark.parametrize("parse", [parse_pretraining_args, parse_tokenizer_args,
                                   lambda argv: parse_finetuning_args(argv + ["--output_dir", "x"])[3]])
def test_overwrite_output_dir_warns_and_means_start_afresh_in_every_script(parse):
    with pytest.warns(FutureWarning, match="--overwrite_output_dir is deprecated"):
        assert parse(["--overwrite_output_dir"]).resume_from_checkpoint == "none"
    assert parse([]).resume_from_checkpoint != "none"


@pytest.mark.parametrize("parse", [
    lambda argv: parse_pretraining_args(["--method", "beit", "--tokenizer", "tok"] + argv),
    lambda argv: parse_tokenizer_args(["--method", "vqkd"] + argv),
])
def test_min_crop_scale_is_the_old_spelling_of_crop_min_scale(parse):
    with pytest.warns(FutureWarning, match="use --crop_min_scale"):
        assert parse(["--min_crop_scale", "0.3"]).crop_min_scale == 0.3
    assert parse(["--crop_min_scale", "0.3"]).crop_min_scale == 0.3
    assert parse_finetuning_args(["--crop_min_scale", "0.3", "--output_dir", "x"])[2].crop_min_scale == 0.3


# ---------------------------------------------------------------------------------------------
# Both spellings, aliases in --help, close matches: the same rules in every script
# ---------------------------------------------------------------------------------------------


def segmentation(argv):
    from hf_mim.segmentation.run import parse_segmentation_args

    return parse_segmentation_args(argv + ["--output_dir", "x"])[1]


def shared_settings(script, argv):
    """(learning rate, max steps, batch size, warmup) as each script's parse gives them."""
    if script in ("pretrain", "train_tokenizer"):
        args = (parse_pretraining_args if script == "pretrain" else parse_tokenizer_args)(argv)
    else:
        args = parse_finetuning_args(argv + ["--output_dir", "x"])[3] if script == "finetune" else segmentation(argv)
    return args.learning_rate, args.max_steps, args.per_device_train_batch_size, args.warmup_steps


EVERY_SCRIPT = ["pretrain", "train_tokenizer", "finetune", "segment"]
UNDERSCORES = ["--learning_rate", "0.25", "--max_train_steps", "9", "--per_device_train_batch_size", "3",
               "--num_warmup_steps", "4"]


@pytest.mark.parametrize("script", EVERY_SCRIPT)
def test_every_script_takes_both_spellings_of_every_option(script):
    dashes = [arg.replace("_", "-") if arg.startswith("--") else arg for arg in UNDERSCORES]
    assert dashes[0] == "--learning-rate"
    assert shared_settings(script, dashes) == shared_settings(script, UNDERSCORES) == (0.25, 9, 3, 4)
    with_equals = [f"{name}={value}" for name, value in zip(dashes[::2], dashes[1::2])]
    assert shared_settings(script, with_equals) == (0.25, 9, 3, 4)


def test_a_dash_spelled_learning_rate_still_wins_over_the_default_base_learning_rate():
    """finetune.py tells an explicit --learning_rate from a default one by the command line: in both spellings."""
    _, _, finetuning, training = parse_finetuning_args(["--learning-rate", "1e-4", "--output-dir", "x"])
    assert (training.learning_rate, finetuning.base_learning_rate) == (1e-4, None)


@pytest.mark.parametrize("negative", ["--no_do_eval", "--no-do_eval", "--no-do-eval", "--do_eval=false"])
def test_flags_take_every_negative_spelling(negative):
    assert parse_pretraining_args([negative]).do_eval is False
    assert parse_tokenizer_args(["--method", "dvae", negative]).do_eval is False


def help_text(script) -> str:
    from hf_mim.pretraining.arguments import build_parser as pretraining_parser
    from hf_mim.tokenizer_training.arguments import build_parser as tokenizer_parser

    if script in ("pretrain", "train_tokenizer"):
        parser = pretraining_parser("beit") if script == "pretrain" else tokenizer_parser("vqkd")
        return " ".join(parser.format_help().split())
    with pytest.raises(SystemExit) as exit_info:
        parse_finetuning_args(["--help"]) if script == "finetune" else segmentation(["--help"])
    assert exit_info.value.code == 0
    return ""


@pytest.mark.parametrize("script", EVERY_SCRIPT)
def test_help_lists_the_aliases_users_know(script, capsys):
    text = help_text(script) or " ".join(capsys.readouterr().out.split())
    assert "--max_train_steps" in text and "--num_warmup_steps" in text
    assert "alias of --max_steps" in text or "(alias: --max_train_steps" in text
    for old, new in (("--warmup_ratio", "--warmup_steps"), ("--evaluation_strategy", "--eval_strategy"),
                     ("--push_to_hub_model_id", "--hub_model_id")):
        assert f"{old} " in text and (f"use {new}" in text or f"to {new}" in text)
    assert "deprecated names (they still work, with a warning)" in text
    if script == "pretrain":  # the renamed method option
        assert "--min_crop_scale MIN_CROP_SCALE" not in text and "--min_crop_scale CROP_MIN_SCALE" in text


@pytest.mark.parametrize("script", EVERY_SCRIPT)
@pytest.mark.parametrize("typo,suggestion", [("--learning_rat", "--learning_rate"), ("--learning-r", "--learning_rate"),
                                             ("--warmup_stepz", "--warmup_steps")])
def test_a_wrong_option_is_refused_with_the_closest_names(script, typo, suggestion, capsys):
    """Also abbreviations: argparse would read `--learning-r` as --learning_rate, and the scripts could not
    tell which options a user gave."""
    with pytest.raises(SystemExit) as exit_info:
        shared_settings(script, [typo, "0.1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"unrecognized arguments: {typo} (did you mean {suggestion}" in error


def test_segmentation_and_finetuning_share_the_data_options():
    from hf_mim.cli import DataSourceArguments
    from hf_mim.finetuning.arguments import DataArguments as FinetuningData
    from hf_mim.training.options import DataArguments as PretrainingData
    from hf_mim.segmentation.run import SegmentationArguments

    shared = {field.name: field for field in dataclasses.fields(DataSourceArguments)}
    for data_class in (FinetuningData, PretrainingData, SegmentationArguments):
        fields = {field.name: field for field in dataclasses.fields(data_class)}
        assert all(fields[name] is field for name, field in shared.items()), data_class  # declared once
    assert segmentation(["--train-dir", "scenes"]).output_dir == "x"


@pytest.mark.parametrize("script", EVERY_SCRIPT)
def test_pretrains_precision_and_tracking_names_work_in_every_script(script):
    """--mixed_precision and --with_tracking (accelerate's names, pretrain.py's) mean --bf16/--fp16 and
    --report_to all everywhere."""
    def settings(argv):
        if script in ("pretrain", "train_tokenizer"):
            args = (parse_pretraining_args if script == "pretrain" else parse_tokenizer_args)(argv)
            from hf_mim.training.arguments import resolve_mixed_precision
            return resolve_mixed_precision(args), args.report_to
        argv = argv + ["--use_cpu"]  # bf16 without a GPU: the Trainer's own check, not ours
        finetune = script == "finetune"
        training = parse_finetuning_args(argv + ["--output_dir", "x"])[3] if finetune else segmentation(argv)
        return "bf16" if training.bf16 else "fp16" if training.fp16 else None, training.report_to

    assert settings(["--mixed_precision", "bf16", "--with_tracking"]) == settings(["--bf16", "--report_to", "all"])
    assert settings(["--mixed-precision", "fp16"])[0] == "fp16"


@pytest.mark.parametrize("parse", [parse_pretraining_args, parse_tokenizer_args])
@pytest.mark.parametrize("argv,message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    (["--gradient-accumulation-steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    (["--logging_steps", "0"], "--logging_steps must be at least 1, got 0"),
    (["--streaming", "--train_dir", "x"], "A streamed data set has no length: pass --max_steps"),
    (["--eval_strategy", "steps", "--train_dir", "x"], "--eval_strategy steps needs --eval_steps N"),
    (["--bf16", "--mixed_precision", "fp16"], "Conflicting precision options"),
])
def test_bad_values_fail_at_parsing_with_the_option_named(parse, argv, message):
    with pytest.raises(ValueError, match=message):
        parse(argv)


@pytest.mark.parametrize("argv,message", [(["--warmup_steps", "1.5"], "a fractional warmup is a ratio in"),
                                          (["--checkpointing_steps", "0"], "expected a positive number of steps"),
                                          (["--lr_scheduler_kwargs", "[1]"], "expected a JSON object")])
def test_values_with_their_own_parsing_function_are_checked_by_it(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_pretraining_args(argv)
    assert message in capsys.readouterr().err


def test_a_method_registered_after_import_is_a_choice(monkeypatch):
    """--method's choices are the registry's when the parser is built, not when the module was imported."""
    from hf_mim.pretraining.methods import METHODS, get_method

    monkeypatch.setitem(METHODS, "my_mae", get_method("mae"))
    assert parse_pretraining_args(["--method", "my_mae"]).method == "my_mae"
