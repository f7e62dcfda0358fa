"""Visual-tokenizer training (`examples/train_tokenizer.py`): dVAE, VQ-KD and PeCo as methods of the
training engine (`hf_mim.training`), in their own registry."""

from ..training import run_training
from .arguments import build_parser, parse_args
from .methods import TOKENIZER_METHODS, TokenizerMethod, get_tokenizer_method, register_tokenizer_method
from .peco_losses import PecoLoss, PerceptualNetwork, load_feature_network_for


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return run_training(args, get_tokenizer_method(args.method))


__all__ = ["TOKENIZER_METHODS", "PecoLoss", "PerceptualNetwork", "TokenizerMethod", "build_parser",
           "get_tokenizer_method", "load_feature_network_for", "main", "parse_args", "register_tokenizer_method"]
