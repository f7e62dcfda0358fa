"""Configuration of hf_mim's BEiT models (field names as transformers' ``BeitConfig`` where they exist)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_vit import VitBackboneConfig


@strict
class BEiTConfig(VitBackboneConfig):
    r"""BEiT (Bao et al., 2022) and BEiT v2 (Peng et al., 2022): predict the visual-token ids of the
    masked patches.

    Defaults are the published BEiT ViT-B/16 pre-training model: 768 x 12 with 12 heads, layer
    scale 0.1, one relative position bias table shared by all blocks, no absolute position
    embedding, drop path 0.1, a vocabulary of 8192 visual tokens. Unlike transformers' ``BeitConfig``,
    ``layer_norm_eps`` defaults to the reference's 1e-6 and ``image_size``/``patch_size`` may be
    (height, width) pairs.

    Position information: ``use_shared_relative_position_bias`` (pre-training: one table added in
    every block), ``use_relative_position_bias`` (fine-tuning: one table per block; loading a
    pre-training checkpoint copies the shared table into each), ``use_absolute_position_embeddings``
    (a learned table; BEiT v1/v2 do not use it). At most one of the two relative kinds.

    ``layer_scale_init_value``: initial value of the per-channel layer scales ``gamma_1``/``gamma_2``
    (0.1 for base, 1e-5 for large); 0 or less builds blocks without layer scale.

    ``use_mean_pooling`` (classification): mean-pool the patch tokens and apply ``fc_norm`` instead
    of taking the final-normed CLS token.

    BEiT v2 CLS-aggregation head (``use_cls_pretext_head``, pre-training only): the patch tokens
    that come out of block number ``cls_head_early_layer`` (counted from 1, i.e. the output of
    ``blocks[cls_head_early_layer - 1]``, which is ``hidden_states[cls_head_early_layer]``: 9 of 12
    for base, 21 of 24 for large) are concatenated with the CLS token of the last block (before the
    final norm) and passed through ``cls_head_depth`` extra blocks (``cls_pt_layers``); the final
    norm and the LM head are shared (``shared_lm_head``, the published models; ``False`` gives the head
    its own ``cls_pt_norm`` and ``cls_pt_lm_head``, beit2's option), and their loss is added 1:1 to
    the main loss. The head's drop-path rates continue the encoder's ramp as in beit2:
    ``linspace(0, drop_path_rate, max(num_hidden_layers, cls_head_early_layer + cls_head_depth))``.

    Example:

    ```python
    >>> from hf_mim import BEiTConfig, BEiTForMaskedImageModeling
    >>> model = BEiTForMaskedImageModeling(BEiTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3))
    ```
    """

    model_type = "hf_mim_beit"

    vocab_size: int = 8192
    drop_path_rate: float | int = 0.1  # BEiT pre-trains with drop path
    layer_scale_init_value: float | int = 0.1
    use_absolute_position_embeddings: bool = False
    use_shared_relative_position_bias: bool = True
    use_relative_position_bias: bool = False
    use_mean_pooling: bool = True
    use_cls_pretext_head: bool = False
    cls_head_early_layer: int = 9
    cls_head_depth: int = 2
    shared_lm_head: bool = True

    def validate_architecture(self):
        super().validate_architecture()
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1 (the tokenizer's codebook size), got {self.vocab_size}.")
        if self.use_shared_relative_position_bias and self.use_relative_position_bias:
            raise ValueError(
                "use_shared_relative_position_bias and use_relative_position_bias are both set: choose one "
                "(shared for pre-training, per-block for fine-tuning; loading a shared table into a per-block "
                "model copies it into every block)."
            )
        if self.use_cls_pretext_head:
            if not 1 <= self.cls_head_early_layer <= self.num_hidden_layers:
                raise ValueError(
                    f"cls_head_early_layer={self.cls_head_early_layer} must name a block between 1 and "
                    f"num_hidden_layers={self.num_hidden_layers} (BEiT v2: 9 of 12, 21 of 24)."
                )
            if self.cls_head_depth < 1:
                raise ValueError(f"cls_head_depth must be at least 1 (BEiT v2 uses 2), got {self.cls_head_depth}.")

    @property
    def uses_layer_scale(self) -> bool:
        return self.layer_scale_init_value > 0


# Named architectures of the BEiT family (the model is the same for BEiT, BEiT v2 and PeCo pre-training).
DEMO_SHAPE = dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512)  # 32x32 digits -> 8x8 patches; learns in minutes on two CPU cores
LARGE_SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
PRESETS = {
    "beit-demo": DEMO_SHAPE,
    "beit-base": {},  # ViT-B/16 (BEiTConfig's defaults)
    "beit-large": {**LARGE_SHAPE, "layer_scale_init_value": 1e-5},
    "beitv2-demo": {**DEMO_SHAPE, "use_cls_pretext_head": True, "cls_head_early_layer": 3},  # 3 of 4 blocks
    "beitv2-base": {"use_cls_pretext_head": True},  # ViT-B/16, head on block 9 of 12
    "beitv2-large": {**LARGE_SHAPE, "layer_scale_init_value": 1e-5, "use_cls_pretext_head": True,
                     "cls_head_early_layer": 21},
    "peco-demo": DEMO_SHAPE,
    "peco-base": {},
    "peco-large": {**LARGE_SHAPE, "layer_scale_init_value": 1e-5},
}


__all__ = ["BEiTConfig"]
