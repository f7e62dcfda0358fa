"""BEiT (Bao et al., 2022): predict a frozen dVAE's visual tokens of blockwise-masked patches.

    python examples/pretrain.py --method beit --tokenizer path/to/dvae
"""

from __future__ import annotations

import dataclasses

from ...models import DvaeConfig
from . import register_method
from .masked_prediction import TokenPredictionMethod, TokenTargetOptions


@dataclasses.dataclass
class BeitOptions(TokenTargetOptions):
    _argument_group_name = "BEiT options (--method beit)"


@register_method
class BeitMethod(TokenPredictionMethod):
    name = "beit"
    title = "BEiT"
    summary = "BEiT (Bao et al., 2022): predict a frozen dVAE's visual tokens of blockwise-masked patches."
    options_class = BeitOptions
    expected_tokenizers = (DvaeConfig.model_type,)
    tokenizer_hint = ("the DALL-E dVAE as a DvaeTokenizer, e.g. converted with `python -m hf_mim.convert dalle`; "
                      "any hf_mim tokenizer works")


__all__ = ["BeitMethod", "BeitOptions"]
