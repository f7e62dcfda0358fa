"""One spelling per option across `pretrain.py`, `train_tokenizer.py` and `finetune.py`: the synonyms users
bring from other scripts mean the same everywhere, and a renamed option warns in every script that had it."""

from __future__ import annotations

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


@pytest.mark.parametrize("parse", [lambda argv: parse_pretraining_args(["--method", "beit"] + argv),
                                   lambda argv: parse_tokenizer_args(["--method", "vqkd"] + argv)])
def test_min_crop_scale_is_the_old_spelling_of_crop_min_scale(parse):
    with pytest.warns(FutureWarning, match="use --crop_min_scale"):
        assert parse(["--min_crop_scale", "0.3"]).crop_min_scale == 0.3
    assert parse(["--crop_min_scale", "0.3"]).crop_min_scale == 0.3
    assert parse_finetuning_args(["--crop_min_scale", "0.3", "--output_dir", "x"])[2].crop_min_scale == 0.3
