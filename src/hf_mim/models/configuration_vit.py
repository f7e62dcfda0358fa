"""The configuration fields of the shared ViT core (`vit_core.py`), common to every hf_mim encoder.

Field names are transformers' ``ViTConfig``'s, so its users feel at home; ``layer_norm_eps``
defaults to the reference implementations' 1e-6 (transformers uses 1e-12, wrong for their weights)
and ``image_size``/``patch_size`` may be (height, width) pairs. Each model family's config
subclasses :class:`VitBackboneConfig`, adds its own fields and may change a default by declaring
the field again (BEiT: ``drop_path_rate = 0.1``).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .vit_core import grid_size_for


def check_heads(width: int, heads: int, prefix: str = "") -> None:
    if width % heads:
        raise ValueError(f"{prefix}hidden_size={width} is not divisible by {prefix}num_attention_heads={heads}.")


@strict
class VitBackboneConfig(PreTrainedConfig):
    """Width, depth, regularisation and input geometry of a ViT encoder (defaults: ViT-B/16 at 224 px)."""

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

    def validate_architecture(self):
        super().validate_architecture()
        grid_size_for(self.image_size, self.patch_size)
        check_heads(self.hidden_size, self.num_attention_heads)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")


__all__ = ["VitBackboneConfig", "check_heads"]
