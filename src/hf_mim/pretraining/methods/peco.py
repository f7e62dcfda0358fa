"""PeCo (Dong et al., 2023): BEiT's masked image modeling with a perceptual VQ-VAE's tokens.

    python examples/pretrain.py --method peco --tokenizer path/to/peco   # after train_tokenizer.py --method peco
"""

from __future__ import annotations

import dataclasses

from ...models import PecoConfig
from . import register_method
from .masked_prediction import TokenPredictionMethod, TokenTargetOptions


@dataclasses.dataclass
class PecoOptions(TokenTargetOptions):
    _argument_group_name = "PeCo options (--method peco)"


@register_method
class PecoMethod(TokenPredictionMethod):
    name = "peco"
    title = "PeCo"
    summary = "PeCo (Dong et al., 2023): BEiT's masked image modeling with a perceptual VQ-VAE's tokens."
    options_class = PecoOptions
    expected_tokenizers = (PecoConfig.model_type,)
    require_expected_tokenizer = True  # the tokenizer is what makes it PeCo
    tokenizer_hint = "a PecoTokenizer trained with examples/train_tokenizer.py"


__all__ = ["PecoMethod", "PecoOptions"]
