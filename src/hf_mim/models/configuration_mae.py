"""Configuration of hf_mim's MAE models (field names as transformers' ``ViTMAEConfig``)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .masking import check_mask_ratio
from .vit_core import grid_size_for


@strict
class MaeConfig(PreTrainedConfig):
    r"""MAE (He et al., 2022): encode the visible patches only, reconstruct the pixels of the rest.

    Defaults are the published ViT-B/16 (encoder 768 x 12, decoder 512 x 8 with 16 heads,
    mask ratio 0.75). Unlike ``ViTMAEConfig``, ``layer_norm_eps`` defaults to the reference's
    1e-6, and ``image_size``/``patch_size`` may be (height, width) pairs.

    Example:

    ```python
    >>> from hf_mim import MaeConfig, MaeForPreTraining
    >>> model = MaeForPreTraining(MaeConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3))
    ```
    """

    model_type = "hf_mim_mae"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    decoder_num_attention_heads: int = 16
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_intermediate_size: int = 2048
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    # Image classification: mean-pool the patch tokens and apply `fc_norm` (MAE fine-tuning)
    # instead of taking the final-normed CLS token.
    use_mean_pooling: bool = True

    def validate_architecture(self):
        super().validate_architecture()
        grid_size_for(self.image_size, self.patch_size)
        check_mask_ratio(self.mask_ratio)
        for width, heads, name in (
            (self.hidden_size, self.num_attention_heads, ""),
            (self.decoder_hidden_size, self.decoder_num_attention_heads, "decoder_"),
        ):
            if width % heads:
                raise ValueError(
                    f"{name}hidden_size={width} is not divisible by {name}num_attention_heads={heads}."
                )
            if width % 4:
                raise ValueError(f"{name}hidden_size={width} must be divisible by 4 for the 2-D sin-cos table.")


__all__ = ["MaeConfig"]
