"""What both exports share: reading an hf_mim checkpoint and naming its weights as the reference
implementations (timm, facebookresearch/mae, microsoft/unilm) do. Those names are the converters'
intermediate names (`hf_mim.convert`): timm loads them almost as they are, and the converters'
transformers -> reference maps tell which reference weight each transformers parameter is.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForPreTraining, PreTrainedModel

from ..models.vit_core import grid_size_for, sincos_2d_table

EXPORTABLE_TYPES = ("hf_mim_mae", "hf_mim_beit", "hf_mim_vit_mpp")


class ExportError(ValueError):
    """The target library cannot represent this model (the message says what to do instead)."""


def load_hf_mim_model(path: str) -> PreTrainedModel:
    """The checkpoint with the head it was saved with (pre-training or classification), in eval mode."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in EXPORTABLE_TYPES:
        raise ExportError(
            f"{path} is a {config.model_type} model; exports exist for the encoders {list(EXPORTABLE_TYPES)} (MAE, "
            "BEiT / BEiT v2, ViT-MPP). Visual tokenizers have no timm or transformers counterpart."
        )
    architecture = (config.architectures or [""])[0]
    auto = AutoModelForImageClassification if architecture.endswith("ForImageClassification") else None
    if auto is None and architecture.endswith(("ForPreTraining", "ForMaskedImageModeling")):
        auto = AutoModelForPreTraining
    if auto is None:
        from transformers import AutoModel

        auto = AutoModel
    return auto.from_pretrained(path).eval()


def encoder_of(model: PreTrainedModel):
    return model.base_model


def is_classifier(model: PreTrainedModel) -> bool:
    return hasattr(model, "head") and isinstance(model.head, torch.nn.Linear)


def reference_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's weights under the reference (timm) names: the encoder prefix dropped, BEiT's
    per-block tables under `attn.`, MAE's decoder as `decoder_*`, and MAE's fixed sin-cos tables
    written out as the learned tables the reference stores (a fine-tuned classifier's own trained table is kept)."""
    prefix = model.base_model_prefix + "."
    state = {}
    for key, value in model.state_dict().items():
        name = key.removeprefix(prefix) if key.startswith(prefix) else key
        name = re.sub(r"^(blocks|cls_pt_layers)\.(\d+)\.rel_pos_bias\.", r"\1.\2.attn.", name)
        name = re.sub(r"^decoder\.(blocks)\.", "decoder_blocks.", name)
        name = re.sub(r"^decoder\.(embed|norm|pred)\.", r"decoder_\1.", name)
        name = "mask_token" if name == "decoder.mask_token" else name
        state[name] = value.detach().clone()
    config = model.config
    if config.model_type == "hf_mim_mae":
        grid = grid_size_for(config.image_size, config.patch_size)
        if "pos_embed" not in state:  # a fixed buffer (pre-training), not saved: write it out
            state["pos_embed"] = sincos_2d_table(grid, config.hidden_size).unsqueeze(0)
        if "decoder_embed.weight" in state:
            state["decoder_pos_embed"] = sincos_2d_table(grid, config.decoder_hidden_size).unsqueeze(0)
    return state


def check_gelu(config, target: str) -> None:
    if config.hidden_act != "gelu":
        raise ExportError(f"{target} uses the exact GELU; this model uses hidden_act={config.hidden_act!r}. Export is "
                          "only possible for models trained with hidden_act='gelu'.")


__all__ = ["ExportError", "check_gelu", "encoder_of", "is_classifier", "load_hf_mim_model", "reference_state_dict"]
