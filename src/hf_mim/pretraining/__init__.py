"""Masked-image-modeling pre-training with Accelerate (`examples/pretrain.py` is its command line).

`methods/` holds what differs between MIM methods, one file each (model, data transforms, loss, figures);
`trainer_loop` the one training loop; `checkpoints` crash-safe, exactly resumable checkpoints.
"""

from .arguments import build_parser, parse_args
from .methods import METHODS, PretrainingMethod, get_method, register_method  # registers every method
from .trainer_loop import run_pretraining


def main(argv: list[str] | None = None) -> dict:
    return run_pretraining(parse_args(argv))


__all__ = ["METHODS", "PretrainingMethod", "build_parser", "get_method", "main", "parse_args", "register_method",
           "run_pretraining"]
