"""hf_mim encoders as transformers backbones: feature maps for dense tasks (UperNet, DPT, detection).

A backbone runs the encoder (without its final norm, as BEiT's and MAE's segmentation code does),
takes the patch tokens of the chosen stages (``config.out_features`` / ``out_indices``; stage 0 is
the patch embedding, stage k the output of block k) and lays them out as maps [B, D, H/p, W/p].
With ``config.add_fpn`` the four maps go through BEiT's segmentation neck: x4 (two 2x2
deconvolutions with BatchNorm and GELU between), x2 (one deconvolution), identity, and a 2x2
max-pool, so a UperNet head gets a pyramid at strides p/4, p/2, p and 2p.

Any input size divisible by the patch size works: the encoders resize their position tables (MAE's
sin-cos table is regenerated, learned tables are resized bicubically, BEiT's relative position
bias with its geometric resize) for the grid of each input. To train at a new size with the tables
stored at that size, rebuild with ``hf_mim.finetuning.classifier.change_image_size``.

Checkpoints: a pre-training or fine-tuning checkpoint of the same family loads; what the backbone
does not use (decoder, LM / colour / classification heads, mask token, final norm, ``fc_norm``)
is expected and ignored; the neck is new (reported missing). This file ships with saved backbones
(``trust_remote_code``): torch, transformers and its siblings only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from .modeling_beit import BEiTModel, BEiTPreTrainedModel
from .modeling_mae import MaeModel, MaePreTrainedModel
from .modeling_vit_mpp import VitMppModel, VitMppPreTrainedModel

# What a backbone never uses from a checkpoint of its family, whichever head saved it.
UNUSED_BY_BACKBONES = [
    r"(^|\.)mask_token$", r"^(\w+\.)?norm\.(weight|bias)$", r"^fc_norm\.", r"^head\.",
    r"^decoder\.", r"^lm_head\.", r"^cls_pt_layers\.", r"^mpp_head\.", r"relative_position_index",
]


def tokens_to_map(hidden_state: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, 1+N, D] (CLS first) -> the patch tokens as a map [B, D, rows, cols]."""
    batch, _, width = hidden_state.shape
    patches = hidden_state[:, 1:]  # [B, N, D]
    return patches.transpose(1, 2).reshape(batch, width, *grid)  # [B, D, rows, cols]


class FeaturePyramidNeck(nn.Module):
    """BEiT's segmentation neck (`fpn1` .. `fpn4` of its backbone): four same-size maps [B, D, h, w]
    -> [B, D, 4h, 4w], [B, D, 2h, 2w], [B, D, h, w], [B, D, h/2, w/2]."""

    def __init__(self, width: int):
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            nn.BatchNorm2d(width),  # SyncBatchNorm in the reference: nn.SyncBatchNorm.convert_sync_batchnorm
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        grid = feature_maps[-1].shape[-2:]
        if min(grid) < 2:
            raise ValueError(
                f"The feature pyramid max-pools the last map 2x2, but the patch grid is {tuple(grid)}. Use images "
                "of at least 2 patches per side (or a backbone without add_fpn)."
            )
        necks = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return tuple(neck(feature_map) for neck, feature_map in zip(necks, feature_maps))


class VitBackboneMixin(BackboneMixin):
    """The backbone logic for every hf_mim encoder family; a family's class builds its encoder
    (under the family's ``base_model_prefix``, without mask token or final norm) and calls
    :meth:`build_backbone`. Attention maps come on request (``output_attentions`` runs the eager kernel for
    that call), so ``BackboneMixin.has_attentions`` keeps its default, True."""

    _keys_to_ignore_on_load_unexpected = UNUSED_BY_BACKBONES

    def build_backbone(self, config) -> None:
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.neck = FeaturePyramidNeck(config.hidden_size) if config.add_fpn else None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The family's init, plus the neck's: PyTorch's deconvolution init (what the reference
        keeps) and a fresh BatchNorm."""
        super()._init_weights(module)
        if isinstance(module, nn.ConvTranspose2d) and not getattr(module.weight, "_is_hf_initialized", False):
            module.reset_parameters()
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        """feature_maps: one [B, D, H/p, W/p] map per chosen stage (through the neck with ``add_fpn``),
        or the stage's tokens [B, 1+N, D] with ``reshape_hidden_states=False``; hidden_states (when
        asked): the encoder's, [B, 1+N, D] each; attentions (when asked): each block's [B, H, 1+N, 1+N]."""
        encoder = self.base_model
        grid = encoder.patch_embed.grid_size(pixel_values)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        encoded = encoder(pixel_values, output_hidden_states=True, output_attentions=output_attentions,
                          return_dict=True)
        feature_maps = tuple(encoded.hidden_states[index] for index in self.out_indices)  # [B, 1+N, D] each
        if self.config.reshape_hidden_states:  # else tokens, CLS first (DPT's reassemble stage reads them)
            feature_maps = tuple(tokens_to_map(stage, grid) for stage in feature_maps)  # [B, D, rows, cols]
            if self.neck is not None:
                feature_maps = self.neck(feature_maps)
        output = BackboneOutput(feature_maps=feature_maps, attentions=encoded.attentions,
                                hidden_states=encoded.hidden_states if output_hidden_states else None)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class MaeBackbone(VitBackboneMixin, MaePreTrainedModel):
    hub_auto_map = {**MaePreTrainedModel.hub_auto_map, "AutoBackbone": "modeling_backbone.MaeBackbone"}

    def __init__(self, config):
        super().__init__(config)
        self.encoder = MaeModel(config, use_final_norm=False)
        self.build_backbone(config)
        self.post_init()


class BEiTBackbone(VitBackboneMixin, BEiTPreTrainedModel):
    """BEiT / BEiT v2. BEiT's segmentation recipe uses one relative position table per block
    (``use_relative_position_bias=True, use_shared_relative_position_bias=False``): loading a
    pre-training checkpoint then copies its shared table into every block."""

    hub_auto_map = {**BEiTPreTrainedModel.hub_auto_map, "AutoBackbone": "modeling_backbone.BEiTBackbone"}

    def __init__(self, config):
        super().__init__(config)
        self.beit = BEiTModel(config, use_mask_token=False, use_final_norm=False)
        self.build_backbone(config)
        self.post_init()


class VitMppBackbone(VitBackboneMixin, VitMppPreTrainedModel):
    hub_auto_map = {**VitMppPreTrainedModel.hub_auto_map, "AutoBackbone": "modeling_backbone.VitMppBackbone"}

    def __init__(self, config):
        super().__init__(config)
        self.vit = VitMppModel(config, use_mask_token=False, use_final_norm=False)
        self.build_backbone(config)
        self.post_init()


__all__ = ["BEiTBackbone", "FeaturePyramidNeck", "MaeBackbone", "VitBackboneMixin", "VitMppBackbone", "tokens_to_map"]
