"""hf_mim.recipe: the one recipe-resolution step of pretrain.py, train_tokenizer.py and finetune.py (a pure
function of its layers), and its use by each script's parser."""

from __future__ import annotations

import pytest

from hf_mim.recipe import (
    PAPER, SMALL_DATA_MAX_IMAGES, USER, Setting, data_size_layer, explicit_options, is_small_data, recipe_line,
    resolve_recipe,
)

PAPER_VALUES = {"base_learning_rate": 1e-3, "layer_decay": 0.75, "drop_path": 0.1, "aa": "rand-m9-mstd0.5-inc1"}
SMALL = {"base_learning_rate": 4e-3, "layer_decay": 1.0, "drop_path": 0.0}


def test_later_layers_win_and_the_user_wins_over_all():
    recipe = resolve_recipe([(PAPER, PAPER_VALUES), ("small data", SMALL)], {"layer_decay": 0.75})
    assert recipe == {"base_learning_rate": Setting(4e-3, "small data"), "layer_decay": Setting(0.75, USER),
                      "drop_path": Setting(0.0, "small data"), "aa": Setting("rand-m9-mstd0.5-inc1", PAPER)}
    assert resolve_recipe([(PAPER, PAPER_VALUES)], {}) == {name: Setting(value, PAPER)
                                                          for name, value in PAPER_VALUES.items()}
    assert PAPER_VALUES["layer_decay"] == 0.75  # the layers are not modified


@pytest.mark.parametrize(("images", "from_scratch", "applies"), [
    (1_000, True, True), (SMALL_DATA_MAX_IMAGES - 1, True, True), (SMALL_DATA_MAX_IMAGES, True, False),
    (None, True, False),  # a stream: large
    (1_000, False, False),  # pre-trained weights: the paper's fine-tuning recipe
])
def test_the_data_size_rule_applies_to_small_data_from_scratch(images, from_scratch, applies):
    layer = data_size_layer(images, from_scratch, SMALL)
    assert is_small_data(images) == (images is not None and images < SMALL_DATA_MAX_IMAGES)
    assert bool(layer) == applies
    if applies:
        assert layer == [(f"data-size rule: {images:,} training images < 50,000, from scratch", SMALL)]


def test_the_line_groups_values_by_origin_paper_first_user_last():
    recipe = resolve_recipe([(PAPER, PAPER_VALUES), ("small data", SMALL)], {"aa": "none", "drop_path": 0.2})
    assert recipe_line(recipe) == ("Recipe in force: small data: base_learning_rate=0.004, layer_decay=1; "
                                   "user: drop_path=0.2, aa=none")
    recipe = resolve_recipe([(PAPER, PAPER_VALUES)], {"drop_path": 0.2})
    assert recipe_line(recipe) == ("Recipe in force: paper: base_learning_rate=0.001, layer_decay=0.75, "
                                   "aa=rand-m9-mstd0.5-inc1; user: drop_path=0.2")
    # an enum (TrainingArguments turns --lr_scheduler_type into one) shows its value, as on the model card
    from transformers.trainer_utils import SchedulerType

    recipe = resolve_recipe([], {"lr_scheduler_type": SchedulerType.LINEAR})
    assert recipe_line(recipe) == "Recipe in force: user: lr_scheduler_type=linear"


def test_explicit_options_know_every_spelling():
    from hf_mim.pretraining.arguments import build_parser

    parser = build_parser("mae")
    names = {"base_learning_rate", "warmup_steps", "weight_decay", "num_train_epochs"}
    assert explicit_options(parser, ["--blr", "1e-3", "--num-warmup-steps=5", "--train_dir", "x"], names) == {
        "base_learning_rate", "warmup_steps"}
    assert explicit_options(parser, ["--weight_decay", "0"], names) == {"weight_decay"}  # a zero is still given


# ---------------------------------------------------------------------------------------------
# Through the scripts' real parsers
# ---------------------------------------------------------------------------------------------


def test_finetune_from_scratch_on_small_data_gets_a_recipe_that_learns():
    from hf_mim.finetuning.arguments import parse_finetuning_args, resolve_finetuning_recipe

    scratch = ["--train_dir", "data", "--config_name", "mae-demo", "--output_dir", "x"]
    _, _, finetuning, training = parse_finetuning_args(scratch)
    assert (finetuning.layer_decay, finetuning.drop_path, finetuning.base_learning_rate) == (0.75, 0.1, 1e-3)
    line = resolve_finetuning_recipe(finetuning, training, 1_000)
    assert (finetuning.layer_decay, finetuning.drop_path, finetuning.base_learning_rate) == (1.0, 0.0, 4e-3)
    assert ("data-size rule: 1,000 training images < 50,000, from scratch: base_learning_rate=0.004, layer_decay=1, "
            "drop_path=0, aa=none, reprob=0") in line
    assert "paper: " in line and "smoothing=0.1" in line and "num_train_epochs=50" in line
    assert (finetuning.aa, finetuning.reprob) == ("none", 0.0)
    resolve_finetuning_recipe(finetuning, training, 1_000_000)  # large data: the paper's
    assert (finetuning.layer_decay, finetuning.drop_path, finetuning.base_learning_rate) == (0.75, 0.1, 1e-3)
    assert (finetuning.aa, finetuning.reprob) == ("rand-m9-mstd0.5-inc1", 0.25)

    _, _, finetuning, training = parse_finetuning_args(scratch + ["--layer-decay", "0.75", "--learning_rate", "1e-4"])
    line = resolve_finetuning_recipe(finetuning, training, 1_000)
    assert (finetuning.layer_decay, finetuning.drop_path, finetuning.base_learning_rate) == (0.75, 0.0, None)
    assert training.learning_rate == 1e-4 and line.endswith("user: layer_decay=0.75, learning_rate=0.0001")

    _, _, finetuning, training = parse_finetuning_args(["--train_dir", "data", "--model_name_or_path", "ckpt",
                                                        "--output_dir", "x"])
    assert "data-size rule" not in resolve_finetuning_recipe(finetuning, training, 1_000)  # pre-trained: the paper's
    assert (finetuning.layer_decay, finetuning.drop_path) == (0.75, 0.1)


@pytest.mark.parametrize(("argv", "blr", "origin"), [
    (["--train_dir", "data"], 6e-3, "data-size rule: 10,000 training images"),
    (["--train_dir", "data", "--blr", "1e-4"], 1e-4, "user: base_learning_rate=0.0001"),
    (["--train_dir", "data", "--model_name_or_path", "ckpt"], 1.5e-4, "paper: "),  # continued: not from scratch
    (["--train_dir", "data", "--learning_rate", "1e-3"], 6e-3, "user: learning_rate=0.001"),  # lr wins over blr
])
def test_pretrain_blr_follows_the_data_size_unless_given(argv, blr, origin):
    from hf_mim.pretraining.arguments import parse_args
    from hf_mim.training.arguments import with_data_size_rule

    args = parse_args(argv)
    assert args.base_learning_rate == (1e-4 if "--blr" in argv else 1.5e-4)  # before the data is known
    sized, line = with_data_size_rule(args, 10_000)
    assert sized.base_learning_rate == blr and origin in line
    assert args.base_learning_rate == (1e-4 if "--blr" in argv else 1.5e-4)  # new options; the parsed ones stand
    assert ("base_learning_rate" in line) != ("--learning_rate" in argv)
    assert "num_train_epochs=3" in line and "warmup_steps=0.05" in line and "adam_beta2=0.95" in line
    unsized, line = with_data_size_rule(sized, None)
    assert line and unsized.base_learning_rate == (1e-4 if "--blr" in argv else 1.5e-4)


def test_train_tokenizer_gets_its_own_demo_rate_on_small_data():
    from hf_mim.tokenizer_training.arguments import parse_args
    from hf_mim.training.arguments import with_data_size_rule

    args = parse_args(["--method", "vqkd", "--train_dir", "data", "--teacher", "t"])
    assert args.base_learning_rate == 1e-4  # the paper's
    sized, line = with_data_size_rule(args, 5_000)
    assert sized.base_learning_rate == 4e-3 and "data-size rule: 5,000 training images" in line
    demo = parse_args(["--method", "dvae"])
    sized, line = with_data_size_rule(demo, 1_437)
    assert "digits demo: " in line and sized.base_learning_rate == 4e-3
