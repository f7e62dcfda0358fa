"""Configuration of hf_mim's ViT masked-patch-prediction models (field names as transformers' ``ViTConfig``)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_vit import VitBackboneConfig
from .losses import num_color_classes
from .masking import check_corruption_probs


@strict
class VitMppConfig(VitBackboneConfig):
    r"""ViT masked patch prediction (Dosovitskiy et al., 2021, the ViT paper's self-supervision):
    corrupt a fraction ``mask_ratio`` of the patch embeddings (of those, ``replace_prob`` become a
    learned mask embedding, ``random_prob`` a random other patch embedding of the same image, the
    rest stay unchanged) and predict the ``color_bits``-bit mean colour of every corrupted patch.

    Defaults are ViT-B/16 with learned absolute position embeddings, qkv bias, LayerNorm eps 1e-6
    and the paper's corruption (0.5; 0.8 / 0.1 / 0.1) and 3-bit targets: ``num_color_classes`` is
    (2**color_bits)**num_channels = 512 for RGB. ``image_size``/``patch_size`` may be (height,
    width) pairs.

    ``use_mean_pooling`` (classification): mean-pool the patch tokens and apply ``fc_norm`` (the
    default: the MPP loss never trains the CLS token) instead of taking the final-normed CLS token
    (the ViT paper's classifier; set it to False for that).

    Example:

    ```python
    >>> from hf_mim import VitMppConfig, VitMppForPreTraining
    >>> model = VitMppForPreTraining(VitMppConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3))
    ```
    """

    model_type = "hf_mim_vit_mpp"

    qkv_bias: bool = True
    mask_ratio: float | int = 0.5
    replace_prob: float | int = 0.8
    random_prob: float | int = 0.1
    color_bits: int = 3
    use_mean_pooling: bool = True

    @property
    def num_color_classes(self) -> int:
        """Classes of the mean-colour head: (2**color_bits)**num_channels."""
        return num_color_classes(self.num_channels, self.color_bits)

    def validate_architecture(self):
        super().validate_architecture()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio (the fraction of patches corrupted) must be in [0, 1), got {self.mask_ratio}. ViT uses 0.5."
            )
        check_corruption_probs(self.replace_prob, self.random_prob)
        if not 1 <= self.color_bits <= 8:
            raise ValueError(f"color_bits must be between 1 and 8 (ViT uses 3), got {self.color_bits}.")
        if self.num_color_classes > 2**24:
            raise ValueError(
                f"color_bits={self.color_bits} with num_channels={self.num_channels} gives {self.num_color_classes} "
                "classes; lower color_bits (ViT: 3 bits x 3 channels = 512)."
            )


# Named architectures (`--config_name vit_mpp-base`); the demo learns the embedded digits on two CPU cores.
PRESETS = {
    "vit_mpp-demo": dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512),
    "vit_mpp-base": {},
    "vit_mpp-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


__all__ = ["VitMppConfig"]
