"""Visual-tokenizer training (`examples/train_tokenizer.py`): dVAE, VQ-KD and PeCo as methods of the one
pre-training loop (`hf_mim.pretraining.run_pretraining`), in their own registry."""

from .arguments import build_parser, parse_args
from .methods import TOKENIZER_METHODS, TokenizerMethod, get_tokenizer_method, register_tokenizer_method
from .peco_losses import PecoLoss, PerceptualNetwork, load_feature_network_for


def main(argv: list[str] | None = None) -> dict:
    from ..pretraining.trainer_loop import run_pretraining

    args = parse_args(argv)
    return run_pretraining(args, method_class=get_tokenizer_method(args.method))


__all__ = ["TOKENIZER_METHODS", "PecoLoss", "PerceptualNetwork", "TokenizerMethod", "build_parser",
           "get_tokenizer_method", "load_feature_network_for", "main", "parse_args", "register_tokenizer_method"]
