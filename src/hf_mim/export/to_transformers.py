"""hf_mim model -> transformers' own classes (no remote code): `ViTMAE*` for MAE, `Beit*` for BEiT,
`ViT*` for ViT-MPP, where they compute the same function.

Which weight goes where is read off the converters' maps (`hf_mim.convert.mae` / `.beit`:
transformers name -> reference name), applied to every parameter of the target model; hf_mim's
fused `qkv` is split into transformers' query / key / value.

What transformers cannot represent, and the error says so: BEiT v2's CLS pre-training head, ViT-MPP's
colour head (transformers' `ViTForMaskedImageModeling` is SimMIM), and a mean-pooling ViT classifier
(transformers' `ViTForImageClassification` reads the CLS token). `encoder_only=True` exports the
encoder of any of them as `ViTModel` (MAE, ViT-MPP: every token, in order, never masked; `ViTMAEModel` would
drop 75% at random) or `BeitModel`, computing hf_mim's `last_hidden_state` exactly. Their `pooler_output` is
the final-normed CLS token (ViT's pooler set to the identity), which is hf_mim's when the model pools the CLS
token (`use_mean_pooling=False`); hf_mim's default patch-mean pooling has no counterpart in transformers'
classes (BEiT's mean pooler presumes an encoder without a final norm), so the export says so and names the
one line that gives it: `last_hidden_state[:, 1:].mean(1)`.
"""

from __future__ import annotations

import logging
import re

import torch
from transformers import (
    BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, BeitModel, ViTConfig,
    ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining, ViTModel,
)

from ..convert import beit as beit_converter
from ..convert import mae as mae_converter
from .common import ExportError, check_gelu, is_classifier, reference_state_dict

VIT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
              "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
              "image_size", "patch_size", "num_channels")
# ViT names that the MAE converter's map does not cover (ViTForImageClassification's head).
VIT_TO_REFERENCE = [*mae_converter.TRANSFORMERS_TO_REFERENCE, (r"^classifier\.", "head.")]
EXPORT_FIX = ("Export the encoder alone (--encoder_only: {encoder}), or export to timm "
              "(`python -m hf_mim.export timm`), "
              "or load the hf_mim checkpoint itself with trust_remote_code=True.")


logger = logging.getLogger(__name__)
MEAN_POOLING_NOTE = (
    "{target}'s pooler_output is the final-normed CLS token; this hf_mim model pools the mean of the patch tokens "
    "(use_mean_pooling=True), which no transformers class computes after a final norm. Its tokens are exported "
    "exactly: `outputs.last_hidden_state[:, 1:].mean(1)` is hf_mim's pooler_output (or export to timm, "
    "`python -m hf_mim.export timm`, whose pooled features are)."
)


def shared_fields(config, fields=VIT_FIELDS) -> dict:
    return {name: getattr(config, name) for name in fields}


def labels(model) -> dict:
    config = model.config
    return {"id2label": dict(config.id2label), "label2id": dict(config.label2id)} if is_classifier(model) else {}


def cannot(what: str, encoder: str) -> ExportError:
    return ExportError(f"transformers cannot represent {what}. " + EXPORT_FIX.format(encoder=encoder))


def check_final_norm(model) -> None:
    """transformers' ViT / ViTMAE always end in a LayerNorm; a mean-pooling classifier's encoder has none."""
    if model.base_model.norm is None:
        raise ExportError(
            "transformers cannot represent this classifier: it mean-pools the patch tokens of an encoder without a "
            "final norm (then fc_norm); ViTForImageClassification classifies the normed CLS token and ViTModel ends "
            "in a LayerNorm. Export it to timm (`python -m hf_mim.export timm`, global_pool='avg'), or load the "
            "hf_mim checkpoint itself with trust_remote_code=True."
        )


# ---------------------------------------------------------------------------------------------
# The target model for each family
# ---------------------------------------------------------------------------------------------


def mae_target(model, encoder_only: bool):
    config = model.config
    if encoder_only or not (is_classifier(model) or hasattr(model, "decoder")):
        return encoder_vit(model), VIT_TO_REFERENCE
    if is_classifier(model):
        check_final_norm(model)
        vit_config = ViTConfig(**shared_fields(config), qkv_bias=config.qkv_bias, **labels(model))
        return ViTForImageClassification(vit_config), VIT_TO_REFERENCE
    mae_config = ViTMAEConfig(
        **shared_fields(config), qkv_bias=config.qkv_bias, mask_ratio=config.mask_ratio,
        norm_pix_loss=config.norm_pix_loss, decoder_hidden_size=config.decoder_hidden_size,
        decoder_num_hidden_layers=config.decoder_num_hidden_layers,
        decoder_num_attention_heads=config.decoder_num_attention_heads,
        decoder_intermediate_size=config.decoder_intermediate_size,
    )
    return ViTMAEForPreTraining(mae_config), mae_converter.TRANSFORMERS_TO_REFERENCE


def encoder_vit(model) -> ViTModel:
    """ViTModel with an identity pooler: every token in order, pooler_output = the final-normed CLS token."""
    config = model.config
    check_final_norm(model)
    vit_config = ViTConfig(**shared_fields(config), qkv_bias=config.qkv_bias, pooler_act="linear")
    return ViTModel(vit_config, add_pooling_layer=True)


def beit_target(model, encoder_only: bool):
    config = model.config
    fields = {name: getattr(config, name) for name in (
        *VIT_FIELDS, "vocab_size", "drop_path_rate", "use_absolute_position_embeddings", "use_relative_position_bias",
        "use_shared_relative_position_bias", "use_mean_pooling")}
    beit_config = BeitConfig(**fields, layer_scale_init_value=float(config.layer_scale_init_value),
                             use_mask_token=not is_classifier(model), **labels(model))
    if encoder_only or not (is_classifier(model) or hasattr(model, "lm_head")):
        # BeitModel ends in a LayerNorm unless it mean-pools: the same as the encoder's final norm, or its absence
        beit_config.use_mean_pooling = model.base_model.norm is None
        return BeitModel(beit_config, add_pooling_layer=True), beit_converter.TRANSFORMERS_TO_REFERENCE
    if is_classifier(model):
        return BeitForImageClassification(beit_config), beit_converter.TRANSFORMERS_TO_REFERENCE
    if getattr(model, "cls_pt_layers", None) is not None:
        raise cannot("BEiT v2's CLS pre-training head (cls_pt_layers): BeitForMaskedImageModeling has none",
                     "BeitModel")
    if not config.use_mean_pooling:
        beit_config.use_mean_pooling = True  # BeitForMaskedImageModeling's own norm is the final norm
    return BeitForMaskedImageModeling(beit_config), beit_converter.TRANSFORMERS_TO_REFERENCE


def vit_mpp_target(model, encoder_only: bool):
    config = model.config
    if encoder_only or not (is_classifier(model) or hasattr(model, "mpp_head")):
        return encoder_vit(model), VIT_TO_REFERENCE
    if not is_classifier(model):
        raise cannot("ViT masked patch prediction's colour head (ViTForMaskedImageModeling is SimMIM, pixel "
                     "regression)", "ViTModel")
    check_final_norm(model)
    vit_config = ViTConfig(**shared_fields(config), qkv_bias=config.qkv_bias, **labels(model))
    return ViTForImageClassification(vit_config), VIT_TO_REFERENCE


TARGETS = {"hf_mim_mae": mae_target, "hf_mim_beit": beit_target, "hf_mim_vit_mpp": vit_mpp_target}


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def reference_name(key: str, mapping: list[tuple[str, str]]) -> str:
    """A transformers parameter name under the reference names (the converter's map, applied in order)."""
    for pattern, replacement in mapping:
        key = re.sub(pattern, replacement, key)
    return key.replace("encoder_final_norm.", "norm.")  # BEiT's final norm when it does not mean-pool


def reference_tensor(reference: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The reference weight called `name`; query / key / value are slices of the fused qkv."""
    part = re.fullmatch(r"(.*\.attn)\.([qkv])\.(weight|bias)", name)
    if part is None:
        return reference[name]
    attn, which, kind = part.groups()
    if kind == "bias" and f"{attn}.{which}_bias" in reference:  # BEiT: q_bias / v_bias (k has none)
        return reference[f"{attn}.{which}_bias"]
    fused = reference[f"{attn}.qkv.{kind}"]  # [3D, D] or [3D]
    return fused.chunk(3, dim=0)["qkv".index(which)]


def export_to_transformers(model, encoder_only: bool = False):
    """The transformers model holding `model`'s weights (in eval mode), ready for `save_pretrained`."""
    config = model.config
    check_gelu(config, "transformers' ViT / BEiT")
    target, mapping = TARGETS[config.model_type](model, encoder_only)
    if is_classifier(model) and isinstance(target, (ViTModel, BeitModel)) and not encoder_only:
        raise cannot("this classifier's head", type(target).__name__)
    reference = reference_state_dict(model)
    weights, missing = {}, []
    for key, value in target.state_dict().items():
        if key.endswith(("relative_position_index", "num_batches_tracked")):
            weights[key] = value
            continue
        if key.startswith("pooler.dense."):  # encoder_vit's identity pooler
            weights[key] = torch.eye(*value.shape) if key.endswith("weight") else torch.zeros_like(value)
            continue
        name = reference_name(key, mapping)
        try:
            weights[key] = reference_tensor(reference, name).reshape(value.shape).to(value.dtype)
        except KeyError:
            missing.append(f"{key} (reference name {name})")
    if missing:
        raise ExportError(f"No hf_mim weight for {missing[:5]} of {type(target).__name__}: this model does not fit "
                          "that class.")
    target.load_state_dict(weights, strict=True)
    if encoder_only and getattr(model.base_model, "norm", None) is not None and config.use_mean_pooling:
        logger.warning(MEAN_POOLING_NOTE.format(target=type(target).__name__))
    return target.eval()


__all__ = ["export_to_transformers"]
