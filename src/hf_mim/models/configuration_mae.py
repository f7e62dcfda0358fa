"""Configuration of hf_mim's MAE models (field names as transformers' ``ViTMAEConfig``)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_vit import VitBackboneConfig, check_heads
from .masking import check_mask_ratio


@strict
class MaeConfig(VitBackboneConfig):
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
    # The encoder's position table: fixed 2-D sin-cos (pre-training, a buffer regenerated for any grid), or
    # a trained parameter initialised from that table (fine-tuning, as the reference's models_vit; saved
    # with the model). MaeForImageClassification always sets it.
    learned_position_embeddings: bool = False

    def validate_architecture(self):
        super().validate_architecture()
        check_mask_ratio(self.mask_ratio)
        check_heads(self.decoder_hidden_size, self.decoder_num_attention_heads, "decoder_")
        for width, name in ((self.hidden_size, ""), (self.decoder_hidden_size, "decoder_")):
            if width % 4:
                raise ValueError(f"{name}hidden_size={width} must be divisible by 4 for the 2-D sin-cos table.")


# Named architectures (`hf_mim.models.presets.from_preset("mae-base")`, `--config_name mae-base`).
PRESETS = {
    # Learns the embedded digits in minutes on two CPU cores.
    "mae-demo": dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, decoder_hidden_size=64, decoder_num_hidden_layers=2,
                     decoder_num_attention_heads=4, decoder_intermediate_size=256),
    "mae-base": {},  # ViT-B/16 with the published 512 x 8 decoder (MaeConfig's defaults)
    "mae-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "mae-huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                     patch_size=14),
}


__all__ = ["MaeConfig"]
