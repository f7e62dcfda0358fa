"""BEiT checkpoints -> hf_mim ``BEiTForMaskedImageModeling`` / ``BEiTForImageClassification`` / ``BEiTModel``.

SRC is either
  * a reference checkpoint of microsoft/unilm (beit, beit2): ``{'model'|'module': state_dict}``.
    Files with ``lm_head`` become a ``BEiTForMaskedImageModeling`` (BEiT v2 files with
    ``cls_pt_layers`` keep the CLS head), fine-tuned files with ``head`` a
    ``BEiTForImageClassification``, files with neither a ``BEiTModel``. The stored
    ``relative_position_index`` buffers are dropped (hf_mim derives them from the grid);
  * a transformers ``BeitForMaskedImageModeling`` / ``BeitForImageClassification`` / ``BeitModel``
    directory, with the names transformers 4 and 5 write to disk (``encoder.layer.N.attention.
    attention.query`` ...) or hold in memory (``layers.N.attention.q_proj`` ...). q, k and v are fused
    into hf_mim's ``qkv`` (k has no bias), ``lambda_1``/``lambda_2`` become ``gamma_1``/``gamma_2``.

The weights tell the width, depth, MLP width, patch size, channels, vocabulary (``lm_head``),
number of classes (``head``), which position information is used (shared table, per-block tables,
absolute table), layer scale or not, the CLS head depth (``cls_pt_layers``) and whether it has its own
norm and LM head (``cls_pt_norm``, ``cls_pt_lm_head``: ``shared_lm_head=False``), the number of heads
(columns of a relative table) and, for a square grid, the image size (rows of a relative table or
length of the absolute one).

What the weights cannot tell comes, for a transformers directory, from its config.json (its
layer_norm_eps too: the microsoft/beit-* configs say 1e-12 where the reference used 1e-6; pass
--config layer_norm_eps=1e-6 to restore it), and for a reference file from the published models'
values: layer_norm_eps 1e-6, drop_path_rate 0.1, layer_scale_init_value 0.1 (width < 1024) or
1e-5 (large), num_attention_heads 12 / 16 for widths 768 / 1024 when no relative table tells,
cls_head_early_layer = depth - 3 (9 of 12, 21 of 24: BEiT v2), use_mean_pooling from ``fc_norm``.
Any BEiTConfig field can be set with --config KEY=VALUE; a value the weights contradict is an error.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import torch
from huggingface_hub.errors import StrictDataclassError

from ..models import BEiTConfig, BEiTForImageClassification, BEiTForMaskedImageModeling, BEiTModel
from ..models.relative_position import NUM_CLS_ROWS
from ..models.vit_core import to_2tuple
from .common import (
    check_config_fields, check_transformers_dir, count_indexed, load_reference_state_dict,
    load_transformers_state_dict, parse_overrides, rename_keys, save_converted, substitute_keys,
)

NAME = "beit"
HELP = "BEiT: microsoft/unilm beit .pth or transformers Beit directory -> hf_mim BEiT model"

HEADS_BY_WIDTH = {768: 12, 1024: 16}  # ViT-B / L
REFERENCE_DEFAULTS = {"layer_norm_eps": 1e-6, "drop_path_rate": 0.1}
# transformers BeitConfig fields with the same meaning in hf_mim's BEiTConfig.
TRANSFORMERS_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "image_size",
    "patch_size", "num_channels", "use_absolute_position_embeddings", "use_relative_position_bias",
    "use_shared_relative_position_bias", "layer_scale_init_value", "drop_path_rate", "use_mean_pooling",
    "id2label", "label2id",
)
TABLE = "relative_position_bias_table"

# transformers Beit names (stored by transformers 4/5, or in memory in transformers 5) -> reference
# names; applied in order to every key.
TRANSFORMERS_TO_REFERENCE = [
    (r"^beit\.layernorm\.", "encoder_final_norm."),  # the final norm when use_mean_pooling=False
    (r"^beit\.pooler\.layernorm\.", "fc_norm."),
    (r"^beit\.", ""),
    (r"^classifier\.", "head."),
    (r"^layernorm\.", "norm."),  # BEiTForMaskedImageModeling's norm before the LM head
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (rf"^(?:encoder\.relative_position_bias|shared_position_bias)\.{TABLE}$", f"rel_pos_bias.{TABLE}"),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
    (rf"\.(?:attention\.attention\.)?relative_position_bias\.{TABLE}$", f".attn.{TABLE}"),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.lambda_1$", ".gamma_1"),
    (r"\.lambda_2$", ".gamma_2"),
    (r"\.attention\.(?:attention\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(?:attention\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(?:attention\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]

# reference names -> hf_mim names; `{prefix}` is "beit." inside the heads, "" for BEiTModel.
_BLOCK_PART = (
    r"(?:norm1|norm2|mlp\.fc1|mlp\.fc2|attn\.proj)\.(?:weight|bias)|attn\.qkv\.weight|attn\.[qv]_bias|gamma_[12]"
)
REFERENCE_TO_HF_MIM = [
    (r"(cls_token|mask_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias))", r"{prefix}\1"),
    (rf"rel_pos_bias\.{TABLE}", rf"{{prefix}}rel_pos_bias.{TABLE}"),
    (rf"blocks\.(\d+)\.({_BLOCK_PART})", r"{prefix}blocks.\1.\2"),
    (rf"blocks\.(\d+)\.attn\.{TABLE}", rf"{{prefix}}blocks.\1.rel_pos_bias.{TABLE}"),
    (rf"cls_pt_layers\.(\d+)\.({_BLOCK_PART})", r"cls_pt_layers.\1.\2"),
    (rf"cls_pt_layers\.(\d+)\.attn\.{TABLE}", rf"cls_pt_layers.\1.rel_pos_bias.{TABLE}"),
    (r"(lm_head|fc_norm|head|cls_pt_norm|cls_pt_lm_head)\.(weight|bias)", r"\1.\2"),
]


def add_arguments(parser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a .pth that pickles objects (e.g. training checkpoints with 'args'); runs code "
                             "from the file, so only for files you trust")


def convert(args, method: str = NAME):
    overrides = parse_overrides(args.config)
    check_config_fields(overrides, BEiTConfig, extra=("num_labels",))
    if os.path.isdir(args.src):
        state_dict, source_config = read_transformers_dir(args.src)
    else:
        state_dict, source_config = load_reference_state_dict(args.src, allow_pickle=args.allow_pickle), None
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}
    check_is_beit(state_dict, args.src)
    check_method(state_dict, method, args.src)
    model_class = model_class_for(state_dict)
    config = build_config(state_dict, source_config, overrides, model_class)
    weights = rename_keys(state_dict, REFERENCE_TO_HF_MIM, "" if model_class is BEiTModel else "beit.", "a BEiT")
    if model_class is BEiTModel:
        model = BEiTModel(config, use_mask_token="mask_token" in state_dict)
    else:
        model = model_class(config)
    save_converted(model, weights, args.out)
    return model


# ---------------------------------------------------------------------------------------------
# Reading the source
# ---------------------------------------------------------------------------------------------


def read_transformers_dir(path: str) -> tuple[dict, dict]:
    """Weights renamed to the reference layout, and the config fields shared with hf_mim's BEiTConfig."""
    check_transformers_dir(path, expected="beit", hf_mim_type=BEiTConfig.model_type, what="Beit",
                           reads="BeitForMaskedImageModeling / BeitForImageClassification / BeitModel")
    from transformers import BeitConfig as TransformersBeitConfig

    config = TransformersBeitConfig.from_pretrained(path)  # fills fields an older config.json leaves out
    fields = {name: getattr(config, name) for name in TRANSFORMERS_FIELDS}
    renamed = substitute_keys(load_transformers_state_dict(path), TRANSFORMERS_TO_REFERENCE)
    if "encoder_final_norm.weight" in renamed:
        if "norm.weight" in renamed or "lm_head.weight" in renamed:
            raise ValueError(
                f"{path} is a BeitForMaskedImageModeling with use_mean_pooling=False: transformers then applies two "
                "LayerNorms before the LM head (beit.layernorm and layernorm), which the reference and hf_mim do not. "
                "It cannot be converted exactly."
            )
        renamed = {re.sub(r"^encoder_final_norm\.", "norm.", k): v for k, v in renamed.items()}
    return fuse_qkv(renamed), fields


def fuse_qkv(state_dict: dict) -> dict:
    """``X.attn.{q,k,v}.weight`` -> ``X.attn.qkv.weight`` (rows q, k, v); q/v biases -> ``q_bias``/``v_bias``."""
    fused, parts = {}, {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.+\.attn\.)([qkv])\.(weight|bias)", key)
        if match is None:
            fused[key] = value
        else:
            parts.setdefault(match[1], {})[f"{match[2]}.{match[3]}"] = value
    for prefix, found in parts.items():
        if "k.bias" in found and bool(found["k.bias"].any()):
            raise ValueError(f"{prefix}k has a nonzero bias: BEiT's attention has none, so it cannot be converted.")
        missing = sorted({"q.weight", "k.weight", "v.weight", "q.bias", "v.bias"} - set(found))
        if missing:
            raise ValueError(f"{prefix}: the query/key/value projections lack {missing}.")
        fused[f"{prefix}qkv.weight"] = torch.cat([found["q.weight"], found["k.weight"], found["v.weight"]], dim=0)
        fused[f"{prefix}q_bias"], fused[f"{prefix}v_bias"] = found["q.bias"], found["v.bias"]
    return fused


def check_is_beit(state_dict: dict, src: str) -> None:
    keys = set(state_dict)
    required = ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias")
    missing = [k for k in required if k not in keys]
    if missing:
        hint = ""
        if "blocks.0.attn.qkv.bias" in keys or any(k.startswith("decoder") for k in keys):
            hint = " It looks like an MAE/timm ViT checkpoint (qkv bias): use the mae converter."
        elif any(k.startswith(("encoder.", "quantize.")) for k in keys):
            hint = " It looks like a VQ-KD tokenizer checkpoint, not a BEiT model."
        raise ValueError(f"{src} does not look like a BEiT checkpoint: it lacks {missing} "
                         f"(found keys such as {sorted(keys)[:6]}).{hint}")


def check_method(state_dict: dict, method: str, src: str) -> None:
    has_cls_head = any(k.startswith("cls_pt_layers.") for k in state_dict)
    if has_cls_head and method == "beit":
        raise ValueError(f"{src} has a BEiT v2 CLS head (cls_pt_layers): convert it with "
                         "`python -m hf_mim.convert beitv2 ...`.")
    if method == "beitv2" and not has_cls_head and "lm_head.weight" in state_dict:
        warnings.warn(f"{src} has an LM head but no CLS head (cls_pt_layers): it is converted without the BEiT v2 "
                      "CLS head (use_cls_pretext_head=False).", stacklevel=2)


def model_class_for(state_dict: dict) -> type:
    if "lm_head.weight" in state_dict:
        return BEiTForMaskedImageModeling
    if "head.weight" in state_dict:
        return BEiTForImageClassification
    return BEiTModel



# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------



def relative_tables(state_dict: dict) -> list[torch.Tensor]:
    return [v for k, v in state_dict.items() if k.endswith(TABLE)]


def shape_fields(state_dict: dict) -> dict:
    """The config fields the weights decide."""
    width, channels, patch_height, patch_width = state_dict["patch_embed.proj.weight"].shape
    fields = {
        "hidden_size": width,
        "num_channels": channels,
        "patch_size": patch_height if patch_height == patch_width else [patch_height, patch_width],
        "num_hidden_layers": count_indexed(state_dict, "blocks."),
        "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "use_shared_relative_position_bias": f"rel_pos_bias.{TABLE}" in state_dict,
        "use_relative_position_bias": f"blocks.0.attn.{TABLE}" in state_dict,
        "use_absolute_position_embeddings": "pos_embed" in state_dict,
        "use_cls_pretext_head": "cls_pt_layers.0.attn.qkv.weight" in state_dict,
    }
    if relative_tables(state_dict):
        fields["num_attention_heads"] = relative_tables(state_dict)[0].shape[1]
    if "lm_head.weight" in state_dict:
        fields["vocab_size"] = state_dict["lm_head.weight"].shape[0]
    if "head.weight" in state_dict:
        fields["num_labels"] = state_dict["head.weight"].shape[0]
        fields["use_mean_pooling"] = "fc_norm.weight" in state_dict
    if fields["use_cls_pretext_head"]:
        fields["cls_head_depth"] = count_indexed(state_dict, "cls_pt_layers.")
        fields["shared_lm_head"] = "cls_pt_lm_head.weight" not in state_dict  # beit2's --shared_lm_head False
    if "blocks.0.gamma_1" not in state_dict:
        fields["layer_scale_init_value"] = 0.0
    return fields


def same_value(name: str, a, b) -> bool:
    if name in ("patch_size", "image_size"):
        return to_2tuple(a) == to_2tuple(b)
    if name == "layer_scale_init_value":  # only "has layer scale or not" is in the weights
        return (a > 0) == (b > 0)
    return a == b


def build_config(state_dict: dict, source_config: dict | None, overrides: dict, model_class: type) -> BEiTConfig:
    from_weights = shape_fields(state_dict)
    for origin, given in (("config.json", source_config or {}), ("--config", overrides)):
        for name, value in from_weights.items():
            if name in given and not same_value(name, given[name], value):
                raise ValueError(f"{origin} sets {name}={given[name]!r} but the weights have {name}={value!r}. "
                                 f"Drop {name} from {origin}.")
    if source_config is not None:  # a transformers directory: its config.json says the rest
        fields = {**source_config, **from_weights}
        if fields["layer_norm_eps"] != 1e-6:
            warnings.warn(f"config.json has layer_norm_eps={fields['layer_norm_eps']}; the reference BEiT weights were "
                          "trained with 1e-6 (pass --config layer_norm_eps=1e-6 to use it).", stacklevel=2)
    else:
        fields = {**REFERENCE_DEFAULTS, **from_weights}
        width = from_weights["hidden_size"]
        if "layer_scale_init_value" not in from_weights:
            fields["layer_scale_init_value"] = 0.1 if width < 1024 else 1e-5
        if "num_attention_heads" not in from_weights and "num_attention_heads" not in overrides:
            if width not in HEADS_BY_WIDTH:
                raise ValueError(f"The weights cannot tell the number of attention heads of a {width}-wide model "
                                 f"(published widths: {HEADS_BY_WIDTH}). Pass --config num_attention_heads=N.")
            fields["num_attention_heads"] = HEADS_BY_WIDTH[width]
        if "image_size" not in overrides:
            fields["image_size"] = image_size_from_tables(state_dict, from_weights)
        if from_weights["use_cls_pretext_head"] and "cls_head_early_layer" not in overrides:
            fields["cls_head_early_layer"] = from_weights["num_hidden_layers"] - 3
            warnings.warn(f"cls_head_early_layer is not in the weights: using the published depth - 3 = "
                          f"{fields['cls_head_early_layer']} (--config cls_head_early_layer=K to change).",
                          stacklevel=2)
    if model_class is BEiTForImageClassification:
        fields.setdefault("use_mean_pooling", True)
    fields.update(overrides)
    try:
        return BEiTConfig(**fields)
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise ValueError(f"The converted config is invalid: {error}\nFix it with --config KEY=VALUE.") from error


def image_size_from_tables(state_dict: dict, from_weights: dict) -> int:
    """The square image the relative or absolute position table was made for."""
    patch_height, patch_width = to_2tuple(from_weights["patch_size"])
    tables = relative_tables(state_dict)
    if tables and patch_height == patch_width:
        side = (math.isqrt(tables[0].shape[0] - NUM_CLS_ROWS) + 1) // 2  # rows = (2*side - 1)^2 + 3
        if (2 * side - 1) ** 2 + NUM_CLS_ROWS == tables[0].shape[0]:
            return side * patch_height
    if "pos_embed" in state_dict and patch_height == patch_width:
        length = state_dict["pos_embed"].shape[1] - 1
        if math.isqrt(length) ** 2 == length:
            return math.isqrt(length) * patch_height
    raise ValueError("The checkpoint does not tell its image size (no position table of a square grid). "
                     "Pass --config image_size=[H,W].")
