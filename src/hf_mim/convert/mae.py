"""MAE checkpoints -> hf_mim ``MaeModel`` / ``MaeForPreTraining`` / ``MaeForImageClassification`` directories.

SRC is either
  * a reference checkpoint of facebookresearch/mae: ``{'model': state_dict}`` with timm names.
    Encoder-only files (the published ``mae_pretrain_vit_*.pth``) become a ``MaeModel``; files with
    the decoder (``mae_visualize_vit_*.pth``, training checkpoints of main_pretrain.py) become a
    ``MaeForPreTraining``; fine-tuned classifiers (``mae_finetuned_vit_*.pth``, main_finetune.py:
    ``head``, ``fc_norm`` with global pooling) become a ``MaeForImageClassification`` with their
    trained position table (``learned_position_embeddings``);
  * a transformers ``ViTMAEForPreTraining`` / ``ViTMAEModel`` directory (config.json + weights), with
    the attention stored either as q_proj/k_proj/v_proj/o_proj (transformers 5 in memory) or as
    attention.attention.query/key/value + attention.output.dense (transformers 4, and what
    transformers 5 writes to disk). q, k and v are fused into hf_mim's single ``qkv`` Linear.

The weights tell the widths, depths, MLP widths, patch size, channels, qkv bias and, for a square
grid, the image size (from the length of the stored position table), and for a classifier the
number of classes and the pooling. hf_mim regenerates the fixed sin-cos position tables of
pre-training instead of storing them; the converter checks that the source's tables are the standard
ones and warns if they are not (the converted model would then compute other outputs). A
fine-tuned classifier's table was trained, so it is kept as it is.

What the weights cannot tell comes, for a transformers directory, from its config.json (all of it,
including its layer_norm_eps: the facebook/vit-mae-* configs say 1e-12 where the reference used
1e-6; pass --config layer_norm_eps=1e-6 to restore it), and for a reference file from these
defaults, the published models' values:
  num_attention_heads          12 / 16 / 16 for widths 768 / 1024 / 1280 (ViT-B / L / H);
                               any other width must pass it
  decoder_num_attention_heads  16
  layer_norm_eps               1e-6
  mask_ratio                   0.75
  norm_pix_loss                false for files with a decoder: the published mae_visualize_* files
                               were trained on raw pixels. Pass norm_pix_loss=true for checkpoints of
                               your own main_pretrain.py runs with --norm_pix_loss (the recipe).
                               true for encoder-only files: the published mae_pretrain_* encoders were
                               trained with it (it matters only for a decoder trained on top later).
The value used is written to the saved config.json. Any MaeConfig field can be set with --config
KEY=VALUE; a value the weights contradict (say hidden_size) is an error.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import torch
from huggingface_hub.errors import StrictDataclassError

from ..models import MaeConfig, MaeForImageClassification, MaeForPreTraining, MaeModel, MimImageProcessor
from ..models.vit_core import grid_size_for, sincos_2d_table, to_2tuple
from .common import (
    check_config_fields, check_transformers_dir, count_indexed, load_reference_state_dict,
    load_transformers_state_dict, parse_overrides, rename_keys, save_converted, substitute_keys,
)

NAME = "mae"
HELP = "MAE: facebookresearch/mae .pth or transformers ViTMAE directory -> MaeModel / MaeForPreTraining"

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}  # ViT-B / L / H
REFERENCE_DEFAULTS = {"decoder_num_attention_heads": 16, "layer_norm_eps": 1e-6, "mask_ratio": 0.75}
# ViTMAEConfig fields with the same meaning in MaeConfig.
TRANSFORMERS_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "image_size",
    "patch_size", "num_channels", "qkv_bias", "decoder_num_attention_heads", "decoder_hidden_size",
    "decoder_num_hidden_layers", "decoder_intermediate_size", "mask_ratio", "norm_pix_loss",
)
TABLES = ("pos_embed", "decoder_pos_embed")  # fixed sin-cos tables: checked, not stored

# transformers ViTMAE names -> reference (timm) names; applied in order to every key.
TRANSFORMERS_TO_REFERENCE = [
    (r"^vit\.", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
    # transformers 5.23 writes the decoder blocks as `decoder_encoder.layer.N` (its reverse renaming).
    (r"^decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.", r"decoder_blocks.\1."),
    (r"^decoder\.", ""),
    (r"^layernorm\.", "norm."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.(?:attention\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(?:attention\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(?:attention\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]

# reference names -> hf_mim names; `{prefix}` is "encoder." inside MaeForPreTraining, "" for MaeModel.
_BLOCK_PART = r"(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
REFERENCE_TO_HF_MIM = [
    (r"(cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias))", r"{prefix}\1"),
    (r"(fc_norm|head)\.(weight|bias)", r"\1.\2"),  # a fine-tuned classifier
    (rf"blocks\.(\d+)\.({_BLOCK_PART})", r"{prefix}blocks.\1.\2"),
    (r"mask_token", "decoder.mask_token"),
    (r"decoder_(embed|norm|pred)\.(weight|bias)", r"decoder.\1.\2"),
    (rf"decoder_blocks\.(\d+)\.({_BLOCK_PART})", r"decoder.blocks.\1.\2"),
]


def add_arguments(parser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a .pth that pickles objects (e.g. training checkpoints with 'args'); runs code "
                             "from the file, so only for files you trust")


def convert(args):
    overrides = parse_overrides(args.config)
    check_config_fields(overrides, MaeConfig, extra=("num_labels",))
    if os.path.isdir(args.src):
        state_dict, source_config = read_transformers_dir(args.src)
    else:
        state_dict, source_config = load_reference_state_dict(args.src, allow_pickle=args.allow_pickle), None
    check_is_mae(state_dict, args.src)
    is_classifier = "head.weight" in state_dict
    # Pre-training tables are the fixed sin-cos ones (checked, regenerated); a classifier's was trained (kept).
    tables = {name: state_dict[name] if is_classifier else state_dict.pop(name)
              for name in TABLES if name in state_dict}
    has_decoder = any(key.startswith(("decoder_", "mask_token")) for key in state_dict)
    if is_classifier and has_decoder:
        raise ValueError(f"{args.src} has both a classification head and an MAE decoder: not a checkpoint the "
                         "reference writes.")
    prefix = "encoder." if has_decoder or is_classifier else ""
    weights = rename_keys(state_dict, REFERENCE_TO_HF_MIM, prefix, "an MAE")
    config = build_config(state_dict, tables, source_config, overrides, has_decoder)
    model_class = MaeForImageClassification if is_classifier else MaeForPreTraining if has_decoder else MaeModel
    if not is_classifier:
        check_position_tables(tables, config)
    model = model_class(config)
    save_converted(model, weights, args.out)
    save_image_processor(config, args.out)
    return model


# ---------------------------------------------------------------------------------------------
# Reading the source
# ---------------------------------------------------------------------------------------------


def read_transformers_dir(path: str) -> tuple[dict, dict]:
    """Weights renamed to the reference layout, and the config fields shared with MaeConfig."""
    check_transformers_dir(path, expected="vit_mae", hf_mim_type=MaeConfig.model_type, what="ViTMAE",
                           reads="ViTMAEForPreTraining / ViTMAEModel")
    from transformers import ViTMAEConfig

    config = ViTMAEConfig.from_pretrained(path).to_dict()  # fills fields an older config.json leaves out
    renamed = substitute_keys(load_transformers_state_dict(path), TRANSFORMERS_TO_REFERENCE)
    return fuse_qkv(renamed), {name: config[name] for name in TRANSFORMERS_FIELDS}


def fuse_qkv(state_dict: dict) -> dict:
    """``X.attn.{q,k,v}.{weight,bias}`` -> ``X.attn.qkv.{weight,bias}`` (rows q, then k, then v)."""
    fused, parts = {}, {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.+\.attn\.)([qkv])\.(weight|bias)", key)
        if match is None:
            fused[key] = value
        else:
            parts.setdefault((match[1], match[3]), {})[match[2]] = value
    for (prefix, kind), found in parts.items():
        if sorted(found) != ["k", "q", "v"]:
            raise ValueError(
                f"{prefix}{{q,k,v}}.{kind}: found only {sorted(found)} of the query/key/value projections."
            )
        fused[f"{prefix}qkv.{kind}"] = torch.cat([found["q"], found["k"], found["v"]], dim=0)
    return fused


def check_is_mae(state_dict: dict, src: str) -> None:
    keys = set(state_dict)
    if any("q_bias" in k or "relative_position" in k or k.startswith("lm_head") for k in keys):
        raise ValueError(f"{src} looks like a BEiT checkpoint (q_bias / relative position bias / lm_head): "
                         "use the BEiT converter (python -m hf_mim.convert beit ...).")
    if "head.weight" in keys and "pos_embed" not in keys:
        raise ValueError(f"{src} is a classifier without its position table (pos_embed), which fine-tuning trains: "
                         "it cannot be converted exactly.")
    required = ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in keys]
    if missing:
        raise ValueError(f"{src} does not look like an MAE checkpoint: it lacks {missing} "
                         f"(found keys such as {sorted(keys)[:6]}).")



# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------



def shape_fields(state_dict: dict) -> dict:
    """The config fields the weights decide."""
    width, channels, patch_height, patch_width = state_dict["patch_embed.proj.weight"].shape
    fields = {
        "hidden_size": width,
        "num_channels": channels,
        "patch_size": patch_height if patch_height == patch_width else [patch_height, patch_width],
        "num_hidden_layers": count_indexed(state_dict, "blocks."),
        "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
    }
    if "head.weight" in state_dict:  # main_finetune.py: global pooling (fc_norm, no norm) unless --cls_token
        fields["num_labels"] = state_dict["head.weight"].shape[0]
        fields["use_mean_pooling"] = "fc_norm.weight" in state_dict
        fields["learned_position_embeddings"] = True
    if "decoder_embed.weight" in state_dict:
        fields["decoder_hidden_size"] = state_dict["decoder_embed.weight"].shape[0]
        fields["decoder_num_hidden_layers"] = count_indexed(state_dict, "decoder_blocks.")
        if "decoder_blocks.0.mlp.fc1.weight" in state_dict:
            fields["decoder_intermediate_size"] = state_dict["decoder_blocks.0.mlp.fc1.weight"].shape[0]
    return fields


def same_value(name: str, a, b) -> bool:
    if name in ("patch_size", "image_size"):
        return to_2tuple(a) == to_2tuple(b)
    return a == b


def build_config(state_dict, tables, source_config, overrides, has_decoder) -> MaeConfig:
    from_weights = shape_fields(state_dict)
    for origin, given in (("config.json", source_config or {}), ("--config", overrides)):
        for name, value in from_weights.items():
            if name in given and not same_value(name, given[name], value):
                raise ValueError(f"{origin} sets {name}={given[name]!r} but the weights have {name}={value!r}. "
                                 f"Drop {name} from {origin}.")
    if source_config is not None:  # a transformers directory: its config.json says everything
        fields = {**source_config, **from_weights}
    else:
        fields = {**REFERENCE_DEFAULTS, "norm_pix_loss": not has_decoder, **from_weights}
        if "num_attention_heads" not in overrides:
            if from_weights["hidden_size"] not in HEADS_BY_WIDTH:
                raise ValueError(f"The weights cannot tell the number of attention heads of a "
                                 f"{from_weights['hidden_size']}-wide encoder (published widths: "
                                 f"{HEADS_BY_WIDTH}). Pass --config num_attention_heads=N.")
            fields["num_attention_heads"] = HEADS_BY_WIDTH[from_weights["hidden_size"]]
        if "image_size" not in overrides:
            fields["image_size"] = image_size_from_table(tables.get("pos_embed"), from_weights)
    fields.update(overrides)
    try:
        return MaeConfig(**fields)
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise ValueError(f"The converted config is invalid: {error}\nFix it with --config KEY=VALUE.") from error


def image_size_from_table(table: torch.Tensor | None, from_weights: dict) -> int:
    """The square image the stored position table was made for; a non-square grid needs --config image_size."""
    if table is not None:
        length = table.numel() // from_weights["hidden_size"] - 1  # minus the CLS row
        side = math.isqrt(length)
        patch_height, patch_width = to_2tuple(from_weights["patch_size"])
        if side * side == length and patch_height == patch_width:
            return side * patch_height
        reason = f"its position table has {length} patch positions, not a square grid"
    else:
        reason = "it has no position table (pos_embed)"
    raise ValueError(f"The checkpoint does not tell its image size: {reason}. Pass --config image_size=[H,W].")


def check_position_tables(tables: dict, config: MaeConfig) -> None:
    """Warn when a stored table is not the standard sin-cos table that hf_mim regenerates."""
    grid = grid_size_for(config.image_size, config.patch_size)
    widths = {"pos_embed": config.hidden_size, "decoder_pos_embed": config.decoder_hidden_size}
    for name, table in tables.items():
        width = widths[name]
        if table.numel() % width:
            raise ValueError(f"{name} has shape {list(table.shape)}, which does not fit the width {width}.")
        table = table.reshape(-1, width).float()
        expected = sincos_2d_table(grid, width)
        if table.shape != expected.shape:
            warnings.warn(f"{name} has {table.shape[0] - 1} positions, the config's {grid[0]}x{grid[1]} grid "
                          f"{grid[0] * grid[1]}: not checked against the sin-cos table.", stacklevel=2)
            continue
        error = (table - expected).abs().max().item()
        if error > 1e-5:
            warnings.warn(
                f"The source's {name} differs from the standard 2-D sin-cos table by up to {error:.3g}. hf_mim "
                "always uses the standard table, so the converted model's outputs will differ from the source's. "
                "(A transformers ViTMAE built from a config and saved without training leaves its tables at zero.)",
                stacklevel=2,
            )


def save_image_processor(config: MaeConfig, out: str) -> None:
    """The MAE preprocessing: resize to the model's image size, ImageNet mean/std (the reference's)."""
    if config.num_channels != 3:
        warnings.warn(f"No image processor saved: the ImageNet mean/std do not fit {config.num_channels} channels. "
                      "Save a MimImageProcessor with your data's image_mean/image_std next to the model.",
                      stacklevel=2)
        return
    height, width = to_2tuple(config.image_size)
    MimImageProcessor(size={"height": height, "width": width}, patch_size=config.patch_size).save_pretrained(out)
