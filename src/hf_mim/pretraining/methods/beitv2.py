"""BEiT v2 (Peng et al., 2022): predict VQ-KD tokens, plus the CLS-aggregation head's loss.

    python examples/pretrain.py --method beitv2 --tokenizer path/to/vqkd
"""

from __future__ import annotations

import dataclasses

from ...models import VqkdConfig
from . import register_method
from .masked_prediction import BEIT_DEFAULTS, TokenPredictionMethod, TokenTargetOptions
from .token_targets import BICUBIC


@dataclasses.dataclass
class Beitv2Options(TokenTargetOptions):
    _argument_group_name = "BEiT v2 options (--method beitv2)"


@register_method
class Beitv2Method(TokenPredictionMethod):
    name = "beitv2"
    title = "BEiT v2"
    summary = "BEiT v2 (Peng et al., 2022): predict VQ-KD tokens, plus the CLS-aggregation head's loss."
    options_class = Beitv2Options
    defaults = {**BEIT_DEFAULTS, "warmup_steps": 10 / 1600}  # 10 warm-up epochs of 1600
    mask_generator = "blockwise_exact"  # beit2 tops the blocks up to exactly --num_mask_patches (v1 does not)
    crop_scale = (0.2, 1.0)
    tokenizer_interpolation = BICUBIC  # the VQ-KD view is 224 px bicubic, the model's own resampling
    heads = {"logits": "", "cls_head_logits": "cls_head_"}
    expected_tokenizers = (VqkdConfig.model_type,)
    tokenizer_hint = "a VqkdTokenizer, e.g. converted with `python -m hf_mim.convert vqkd`; any hf_mim tokenizer works"

    def checked_config(self, config, source, overrides):
        config = super().checked_config(config, source, overrides)
        if not config.use_cls_pretext_head:
            raise ValueError(f"{source} has no BEiT v2 CLS-aggregation head (use_cls_pretext_head=False): use "
                             "--method beit for it, or add --config_overrides use_cls_pretext_head=True.")
        return config

    def recipe(self) -> dict:
        return {**super().recipe(), "cls_head_early_layer": self.config.cls_head_early_layer,
                "cls_head_depth": self.config.cls_head_depth}


__all__ = ["Beitv2Method", "Beitv2Options"]
