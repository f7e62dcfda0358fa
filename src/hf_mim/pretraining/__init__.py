"""Masked-image-modeling pre-training (`examples/pretrain.py` is its command line): the methods, one file
each in `methods/`, and the script's command line (`arguments`), on the training engine `hf_mim.training`
(the one loop, checkpoints, options).
"""

from ..training import run_training
from .arguments import build_parser, parse_args
from .methods import METHODS, TrainingMethod, get_method, register_method  # registers every method


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return run_training(args, get_method(args.method))


__all__ = ["METHODS", "TrainingMethod", "build_parser", "get_method", "main", "parse_args", "register_method"]
