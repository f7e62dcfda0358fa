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
from transformers.backbone_utils import BackboneConfigMixin

from .vit_core import grid_size_for


def check_heads(width: int, heads: int, prefix: str = "") -> None:
    if width % heads:
        raise ValueError(f"{prefix}hidden_size={width} is not divisible by {prefix}num_attention_heads={heads}.")


@strict
class VitBackboneConfig(BackboneConfigMixin, PreTrainedConfig):
    """Width, depth, regularisation and input geometry of a ViT encoder (defaults: ViT-B/16 at 224 px).

    As a backbone (``AutoBackbone``, the ``backbone_config`` of UperNet / DPT; see
    ``modeling_backbone.py``) the stages are ``stem`` (the patch embedding) and ``stage1`` ..
    ``stageL`` (the output of block k, before the final norm: ``hidden_states[k]``);
    ``out_features`` / ``out_indices`` choose the feature maps (default: the last stage) and
    ``add_fpn`` adds BEiT's segmentation neck (4 maps at x4, x2, x1 and x0.5 resolution);
    ``reshape_hidden_states=False`` returns the stages as tokens [B, 1+N, D] instead of maps (what
    DPT's reassemble stage reads, CLS included).
    BEiT's segmentation code counts blocks from 0: its ``out_indices=[3, 5, 7, 11]`` are stages
    ``[4, 6, 8, 12]`` here.
    """

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
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    add_fpn: bool = False
    reshape_hidden_states: bool = True

    def __post_init__(self, **kwargs):
        kwargs.pop("stage_names", None)  # always derived from the depth
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        """Without what the depth derives (the stage names; the default output, the last stage), so that a
        config rebuilt with another depth (``--config_overrides num_hidden_layers=4``) derives them anew."""
        output = super().to_dict()
        output.pop("stage_names", None)
        if output.get("out_indices") == [self.num_hidden_layers]:
            output.pop("out_indices", None)
            output.pop("out_features", None)
        return output

    def set_output_features_output_indices(self, out_features, out_indices):
        """transformers' alignment of ``out_features`` / ``out_indices``, after a check that names the fix."""
        depth = len(self.stage_names) - 1
        beyond = [index for index in out_indices or () if not -depth - 1 <= index <= depth]
        if beyond:
            example = f"; BEiT's segmentation uses {default_pyramid_stages(depth)} for this depth" if depth >= 4 else ""
            raise ValueError(
                f"out_indices {list(out_indices)}: {beyond} lie beyond the depth of this encoder. Stage 0 is the patch "
                f"embedding and stage k the output of block k, so indices must be in [0, {depth}] "
                f"(num_hidden_layers={depth}){example}."
            )
        super().set_output_features_output_indices(out_features, out_indices)

    def validate_architecture(self):
        super().validate_architecture()
        grid_size_for(self.image_size, self.patch_size)
        check_heads(self.hidden_size, self.num_attention_heads)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        if self.add_fpn and not self.reshape_hidden_states:
            raise ValueError("add_fpn needs feature maps: set reshape_hidden_states=True (or add_fpn=False for DPT).")
        if self.add_fpn and len(self.out_indices) != 4:
            default_pyramid_stages(self.num_hidden_layers)  # fewer than 4 blocks: its own error
            raise ValueError(
                f"add_fpn builds BEiT's 4-level neck and needs 4 out_indices, got {self.out_indices}. Use "
                f"out_indices={default_pyramid_stages(self.num_hidden_layers)} for {self.num_hidden_layers} blocks."
            )


def default_pyramid_stages(depth: int) -> list[int]:
    """The 4 stages BEiT's segmentation recipe reads, spread over any depth: [4, 6, 8, 12] of 12
    blocks (its 0-based block ids 3, 5, 7, 11), [8, 12, 16, 24] of 24."""
    if depth < 4:
        raise ValueError(f"BEiT's 4-level segmentation neck needs at least 4 blocks, this encoder has {depth}.")
    return [max(1, round(depth * fraction)) for fraction in (1 / 3, 1 / 2, 2 / 3, 1)]


__all__ = ["VitBackboneConfig", "check_heads", "default_pyramid_stages"]
