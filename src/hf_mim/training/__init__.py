"""The training engine of `examples/pretrain.py` and `examples/train_tokenizer.py`: one command line
(`arguments`: parse once into read-only options), one loop (`loop`), crash-safe checkpoints
(`checkpoints`), and the interface a method implements (`method.TrainingMethod`). The methods live with
their script: `hf_mim.pretraining` (MAE, BEiT, BEiT v2, PeCo, ViT-MPP) and `hf_mim.tokenizer_training`
(dVAE, VQ-KD, PeCo's VQ-VAE), each in its own `MethodRegistry`.
"""

from .arguments import Options, Script, build_parser, parse_options
from .loop import run_training
from .method import MethodRegistry, TrainingMethod

__all__ = ["MethodRegistry", "Options", "Script", "TrainingMethod", "build_parser", "parse_options", "run_training"]
