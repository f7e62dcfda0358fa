"""hf_mim encoder -> a timm model folder: `model.safetensors` and timm's `config.json`
(`architecture`, `model_args`, `pretrained_cfg`), loadable with
``timm.create_model("local-dir:OUT", pretrained=True)`` (and, once uploaded, ``"hf-hub:NAMESPACE/NAME"``).

MAE and ViT-MPP become timm's `VisionTransformer`, BEiT / BEiT v2 timm's `Beit`; the names already
match timm's (the reference code is timm-based). timm has no MAE decoder, BEiT LM head, BEiT v2 CLS
head nor ViT-MPP colour head: the encoder is exported and the parts left out are listed. Pooling:
mean pooling (the hf_mim default) is timm's `global_pool="avg"` (with `fc_norm` when the model has
one), the CLS token `"token"`.
"""

from __future__ import annotations

import json
import logging
import os

from safetensors.torch import save_file

from .common import check_gelu, is_classifier, reference_state_dict

logger = logging.getLogger(__name__)

# Parts of a checkpoint timm has no place for (reference names).
NOT_IN_TIMM = ("decoder_", "mask_token", "lm_head.", "cls_pt_layers.", "mpp_head.")


def common_model_args(model) -> dict:
    config = model.config
    check_gelu(config, "timm")
    classifier = is_classifier(model)
    return {
        "img_size": config.image_size, "patch_size": config.patch_size, "in_chans": config.num_channels,
        "embed_dim": config.hidden_size, "depth": config.num_hidden_layers, "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "num_classes": config.num_labels if classifier else 0,
        "global_pool": "avg" if config.use_mean_pooling else "token",
    }


def timm_model_args(model) -> tuple[str, dict]:
    """(timm architecture, its keyword arguments) that build the same network."""
    config = model.config
    args = common_model_args(model)
    has_fc_norm = getattr(model, "fc_norm", None) is not None
    if config.model_type == "hf_mim_beit":
        args.update(qkv_bias=True, init_values=config.layer_scale_init_value if config.uses_layer_scale else None,
                    use_abs_pos_emb=config.use_absolute_position_embeddings,
                    use_rel_pos_bias=config.use_relative_position_bias,
                    use_shared_rel_pos_bias=config.use_shared_relative_position_bias, use_fc_norm=has_fc_norm)
        return "beit_base_patch16_224", args
    if not config.qkv_bias:
        args["qkv_bias"] = False
    args.update(class_token=True, fc_norm=has_fc_norm)
    return "vit_base_patch16_224", args


def pretrained_cfg(model, processor: dict | None) -> dict:
    """timm's data config: input size, interpolation, crop and normalisation of the checkpoint's processor."""
    config = model.config
    height, width = (config.image_size, config.image_size) if isinstance(config.image_size, int) else config.image_size
    cfg = {"input_size": [config.num_channels, height, width], "interpolation": "bicubic", "crop_pct": 1.0,
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": args_classes(model),
           "fixed_input_size": True}
    if processor:
        cfg["mean"], cfg["std"] = processor.get("image_mean", cfg["mean"]), processor.get("image_std", cfg["std"])
    if is_classifier(model) and config.id2label:
        cfg["label_names"] = [config.id2label[index] for index in sorted(config.id2label)]
    return cfg


def args_classes(model) -> int:
    return model.config.num_labels if is_classifier(model) else 0


def export_to_timm(model, out: str, processor: dict | None = None) -> dict:
    """Write the timm folder; returns its config.json content."""
    architecture, model_args = timm_model_args(model)
    state = reference_state_dict(model)
    left_out = sorted(key for key in state if key.startswith(NOT_IN_TIMM))
    weights = {key: value.contiguous() for key, value in state.items() if key not in left_out}
    if left_out:
        logger.warning("timm has no place for %d parameters of %s (%s ...): exported the encoder%s only.",
                       len(left_out), type(model).__name__, ", ".join(left_out[:3]),
                       " and classification head" if is_classifier(model) else "")
    os.makedirs(out, exist_ok=True)
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    timm_config = {
        "architecture": architecture, "num_classes": model_args["num_classes"],
        "num_features": model.config.hidden_size, "global_pool": model_args["global_pool"],
        "model_args": model_args, "pretrained_cfg": pretrained_cfg(model, processor),
    }
    with open(os.path.join(out, "config.json"), "w") as handle:
        json.dump(timm_config, handle, indent=2)
    return timm_config


__all__ = ["export_to_timm", "timm_model_args"]
