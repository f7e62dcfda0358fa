"""Command line of `examples/train_tokenizer.py`: the engine's (`hf_mim.training.arguments`; the same
options, groups and deprecated aliases as pretrain.py) with the tokenizers' registry and recipes and this
script's texts."""

from __future__ import annotations

import dataclasses

from ..cli import MimArgumentParser, option
from ..recipe import SMALL_DATA_MAX_IMAGES
from ..training.arguments import Options, Script, parse_options
from ..training.arguments import build_parser as build_script_parser
from .methods import TOKENIZER_METHODS

DESCRIPTION = """\
Train a visual tokenizer (the discrete targets of BEiT-style masked image modeling) with Accelerate:
  dvae  DALL-E's discrete VAE (BEiT v1's targets): Gumbel-softmax relaxation, KL to a uniform prior,
        temperature annealed from the optimiser step;
  vqkd  BEiT v2's VQ-KD: a ViT encoder + EMA codebook whose codes must predict the patch features of a
        frozen --teacher (any transformers vision model);
  peco  PeCo's VQ-VAE: pixel + commitment + perceptual loss from a frozen --perceptual_model ViT.

Every logging step (default: every step) logs the loss terms and the codebook's health (usage and
perplexity of the window's codes over all processes, dead codes, and for vqkd/peco a fingerprint of
every process's codebook) to <output_dir>/log.jsonl. The run saves the tokenizer, its image processor
(resize + rescale to [0, 1], no mean/std) and a model card, and the figures codebook_usage.png,
token_maps.png and, for dvae/peco, reconstructions.png. The teacher and the perceptual network are
never saved in the tokenizer. With no data source it trains on the embedded digits (32 px, 8x8
tokens, 64 codes) in a few CPU minutes.
"""

EPILOG = """\
launch modes:
  python examples/train_tokenizer.py --method dvae                       # one process (CPU or one GPU)
  accelerate launch examples/train_tokenizer.py --method vqkd ...        # your `accelerate config`
  accelerate launch --multi_gpu --num_processes 8 examples/train_tokenizer.py --method vqkd ...
  torchrun --nproc_per_node 8 examples/train_tokenizer.py --method vqkd ...
  ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml \\
      examples/train_tokenizer.py --method vqkd ...                      # two CPU processes (CI)

examples:
  # the digits demos: an MAE first (the teacher / perceptual network), then the tokenizers
  python examples/pretrain.py
  python examples/train_tokenizer.py --method vqkd --teacher outputs/pretrain-mae
  python examples/train_tokenizer.py --method peco --perceptual_model outputs/pretrain-mae
  python examples/train_tokenizer.py --method dvae
  # BEiT v2's VQ-KD on ImageNet-1k (the reference recipe: batch 512 = 8 x 64, 100 epochs, lr 2e-4)
  accelerate launch --multi_gpu --num_processes 8 examples/train_tokenizer.py --method vqkd \\
      --dataset_name ILSVRC/imagenet-1k --teacher openai/clip-vit-base-patch16 --teacher_type clip \\
      --per_device_train_batch_size 64 --bf16 --output_dir outputs/vqkd-base
"""

# Help texts of shared options whose pre-training wording would mislead here.
HELP_OVERRIDES = {
    "base_learning_rate": "lr = blr * (batch per device * processes * accumulation) / 256 (default: the method's "
                          "recipe, see --method NAME --help; a higher one, its digits demo's, for the demo and from "
                          f"scratch on fewer than {SMALL_DATA_MAX_IMAGES:,} images: the start of a run prints the "
                          "recipe in force and where each value came from)",
    "num_train_epochs": "(default: the method's recipe; 10 for the digits demo)",
    "logging_steps": "log the loss terms and codebook health every N optimiser steps (default: 1)",
    "do_eval": "distillation / reconstruction loss and codebook usage on held-out images (default: when there are "
               "some)",
}


@dataclasses.dataclass
class TokenizerMethodArguments:
    _argument_group_name = "method"
    method: str = option("vqkd", help="the tokenizer; `--method NAME --help` lists its own options and recipe")


def describe_defaults(method_cls) -> str:
    recipe = ", ".join(f"{key}={value}" for key, value in method_cls.defaults.items())
    demo = ", ".join(f"{key}={value}" for key, value in method_cls.demo_defaults.items())
    return f"{method_cls.summary}.\nRecipe defaults: {recipe}.\nDigits-demo defaults: {demo}."


TOKENIZER_SCRIPT = Script(
    prog="train_tokenizer.py", method_arguments=TokenizerMethodArguments, methods=TOKENIZER_METHODS,
    describe=lambda method_cls: f"{DESCRIPTION}\n--method {method_cls.name}: {describe_defaults(method_cls)}",
    epilog=EPILOG, output_dir="outputs/tokenizer-{method}", parser_defaults={"logging_steps": 1},
    help_overrides=HELP_OVERRIDES,
)


def build_parser(method_name: str = "vqkd") -> MimArgumentParser:
    """pretrain.py's parser (the same options, groups and aliases) with the tokenizer's own options."""
    return build_script_parser(TOKENIZER_SCRIPT, method_name)


def parse_args(argv: list[str] | None = None) -> Options:
    return parse_options(TOKENIZER_SCRIPT, argv)


__all__ = ["TOKENIZER_SCRIPT", "build_parser", "parse_args"]
