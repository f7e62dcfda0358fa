"""BEiT v2's VQ-KD tokenizer checkpoints -> hf_mim ``VqkdTokenizer`` directory.

SRC is a reference checkpoint of microsoft/unilm beit2 (``{'model'|'module'|'state_dict': state_dict}``,
e.g. ``vqkd_encoder_base_decoder_3x768x12_clip``). Its tokenizer weights keep their names
(``encoder.*``, ``decoder.*``, ``encode_task_layer.{0,2}``, ``decode_task_layer.{0,2}``,
``quantize.embedding.weight``). Dropped, and counted in the output: the teacher
(``teacher_model.*``) and its input scaling (``scaling_layer.*``), any ``loss.*`` keys (what the
reference itself drops when it loads a tokenizer), and the reference quantizer's statistics that hf_mim
does not keep (``quantize.cluster_size``, ``quantize.embedding.{cluster_size,embed_avg,initted}``).
hf_mim's ``quantize.initted`` is set to 1 (the reference's own flag when it is 0, with a warning), so
further training continues with EMA steps instead of a new k-means; ``steps_since_used`` starts at 0.

The weights give the encoder and decoder widths, depths and MLP widths, the patch size, channels,
the image size (square grids), the code size and number, q/v biases and ``teacher_dim``. Not in the
weights: the numbers of attention heads (12 for width 768, 16 for 1024, else pass --config
num_attention_heads=... / decoder_num_attention_heads=...) and the teacher, which follows from
teacher_dim: 512 -> CLIP ViT-B/16 (openai/clip-vit-base-patch16, CLIP mean/std), 768 -> DINO ViT-B/16
(facebook/dino-vitb16, ImageNet mean/std). Any VqkdConfig field can be set with --config KEY=VALUE;
a value the weights contradict is an error.
"""

from __future__ import annotations

import math
import warnings

import torch
from huggingface_hub.errors import StrictDataclassError

from ..models import VqkdConfig, VqkdTokenizer
from .common import check_config_fields, count_indexed, load_reference_state_dict, parse_overrides, save_converted

NAME = "vqkd"
HELP = "BEiT v2 VQ-KD tokenizer: microsoft/unilm beit2 vqkd .pth -> hf_mim VqkdTokenizer (teacher keys dropped)"

HEADS_BY_WIDTH = {768: 12, 1024: 16}  # ViT-B / L
TEACHER_PREFIXES = ("teacher", "scaling", "loss")  # the prefixes the reference drops when loading a tokenizer
REFERENCE_STATISTICS = (
    "quantize.cluster_size", "quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
    "quantize.embedding.initted",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEACHERS_BY_DIM = {
    512: {"teacher_name_or_path": "openai/clip-vit-base-patch16", "teacher_type": "clip"},
    768: {"teacher_name_or_path": "facebook/dino-vitb16", "teacher_type": "auto",
          "teacher_image_mean": IMAGENET_MEAN, "teacher_image_std": IMAGENET_STD},
}


def add_arguments(parser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a .pth that pickles objects (training checkpoints with 'args', optimizer state); "
                             "runs code from the file, so only for files you trust")


def convert(args):
    overrides = parse_overrides(args.config)
    check_config_fields(overrides, VqkdConfig)
    state_dict = strip_module_prefix(load_reference_state_dict(args.src, allow_pickle=args.allow_pickle))
    check_is_vqkd(state_dict, args.src)
    weights, dropped = split_reference_keys(state_dict)
    config = build_config(weights, overrides)
    weights["quantize.initted"] = initted_flag(state_dict)
    weights["quantize.steps_since_used"] = torch.zeros(config.num_codes)
    model = VqkdTokenizer(config)
    save_converted(model, weights, args.out)
    for what, keys in dropped.items():
        if keys:
            examples = ", ".join(sorted(keys)[:3]) + (", ..." if len(keys) > 3 else "")
            print(f"Dropped {len(keys)} {what} key(s) ({examples}).")
    return model


def strip_module_prefix(state_dict: dict) -> dict:
    """Keys saved from a DistributedDataParallel wrapper start with ``module.``."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def check_is_vqkd(state_dict: dict, path: str) -> None:
    required = ("encoder.patch_embed.proj.weight", "decoder.patch_embed.proj.weight", "quantize.embedding.weight",
                "encode_task_layer.2.weight", "decode_task_layer.2.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"{path} is not a VQ-KD tokenizer checkpoint: it lacks {missing} (found keys such as "
                         f"{sorted(state_dict)[:6]}). BEiT v2 pre-training checkpoints convert with the beitv2 method.")
    if any("relative_position" in key or "rel_pos_bias" in key for key in state_dict):
        raise ValueError(f"{path} has relative position biases in its tokenizer; hf_mim's VQ-KD has learned absolute "
                         "positions only, as the published tokenizers.")


def split_reference_keys(state_dict: dict) -> tuple[dict, dict]:
    """(tokenizer weights, {kind: dropped keys}); the quantizer statistics and teacher keys are dropped."""
    weights, dropped = {}, {"teacher/scaling/loss": [], "reference quantizer statistics": []}
    for key, value in state_dict.items():
        if key.startswith(TEACHER_PREFIXES):
            dropped["teacher/scaling/loss"].append(key)
        elif key in REFERENCE_STATISTICS:
            dropped["reference quantizer statistics"].append(key)
        else:
            weights[key] = value
    return weights, dropped


def initted_flag(state_dict: dict) -> torch.Tensor:
    flag = state_dict.get("quantize.embedding.initted")
    if flag is not None and not bool(flag.flatten()[0]):
        warnings.warn("The checkpoint's codebook was never initialised (quantize.embedding.initted = 0): its first "
                      "training step will run k-means.", stacklevel=2)
        return torch.tensor(0.0)
    return torch.tensor(1.0)


def vit_fields(state_dict: dict, prefix: str) -> dict:
    """Width, depth, MLP width, patch size, input channels and grid of `encoder.` or `decoder.`."""
    proj = state_dict[f"{prefix}patch_embed.proj.weight"]  # [D, C, ph, pw]
    num_patches = state_dict[f"{prefix}pos_embed"].shape[1] - 1
    return {
        "width": proj.shape[0], "channels": proj.shape[1], "patch": tuple(proj.shape[-2:]),
        "depth": count_indexed(state_dict, f"{prefix}blocks."), "num_patches": num_patches,
        "mlp": state_dict[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0],
    }


def square_side(num_patches: int) -> int | None:
    side = math.isqrt(num_patches)
    return side if side * side == num_patches else None


def fields_from_weights(state_dict: dict, overrides: dict) -> dict:
    encoder, decoder = vit_fields(state_dict, "encoder."), vit_fields(state_dict, "decoder.")
    code_dim = state_dict["encode_task_layer.2.weight"].shape[0]
    reads_code_map = decoder["patch"] == (1, 1) and decoder["channels"] == code_dim
    if not reads_code_map or decoder["num_patches"] != encoder["num_patches"]:
        raise ValueError(
            f"The decoder does not read the code map: patch {decoder['patch']}, {decoder['channels']} input channels, "
            f"{decoder['num_patches']} positions; expected patch (1, 1), code_dim={code_dim} channels and the "
            f"encoder's {encoder['num_patches']} positions. Is this a VQ-KD checkpoint?"
        )
    patch = encoder["patch"][0] if encoder["patch"][0] == encoder["patch"][1] else list(encoder["patch"])
    fields = {
        "hidden_size": encoder["width"], "num_hidden_layers": encoder["depth"], "intermediate_size": encoder["mlp"],
        "patch_size": patch, "num_channels": encoder["channels"],
        "qkv_bias": "encoder.blocks.0.attn.q_bias" in state_dict,
        "code_dim": code_dim, "num_codes": state_dict["quantize.embedding.weight"].shape[0],
        "decoder_hidden_size": decoder["width"], "decoder_num_hidden_layers": decoder["depth"],
        "decoder_intermediate_size": decoder["mlp"], "teacher_dim": state_dict["decode_task_layer.2.weight"].shape[0],
    }
    side = square_side(encoder["num_patches"])
    if side is not None and encoder["patch"][0] == encoder["patch"][1]:
        fields["image_size"] = side * encoder["patch"][0]
    elif "image_size" not in overrides:
        raise ValueError(f"The position table has {encoder['num_patches']} patches, not a square grid of square "
                         "patches: pass --config image_size=[HEIGHT,WIDTH].")
    return fields


def default_fields(fields: dict, overrides: dict) -> dict:
    """What the weights cannot tell: the heads (by width) and the teacher (by teacher_dim)."""
    defaults = dict(TEACHERS_BY_DIM.get(fields["teacher_dim"], {"teacher_name_or_path": None, "teacher_type": "auto"}))
    for width_field, heads_field in (("hidden_size", "num_attention_heads"),
                                     ("decoder_hidden_size", "decoder_num_attention_heads")):
        if heads_field in overrides:
            continue
        if fields[width_field] not in HEADS_BY_WIDTH:
            raise ValueError(f"{width_field}={fields[width_field]}: the number of heads cannot be told from the "
                             f"weights. Pass --config {heads_field}=N.")
        defaults[heads_field] = HEADS_BY_WIDTH[fields[width_field]]
    if defaults["teacher_name_or_path"] is None and "teacher_name_or_path" not in overrides:
        warnings.warn(f"teacher_dim={fields['teacher_dim']} matches no published teacher: the converted config names "
                      "none. Pass --config teacher_name_or_path=... before training further.", stacklevel=2)
    return defaults


def build_config(state_dict: dict, overrides: dict) -> VqkdConfig:
    fields = fields_from_weights(state_dict, overrides)
    for name, value in fields.items():
        if name in overrides and overrides[name] != value:
            raise ValueError(f"--config sets {name}={overrides[name]!r} but the weights have {name}={value!r}.")
    try:
        return VqkdConfig(**{**default_fields(fields, overrides), **overrides, **fields})
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise ValueError(f"The converted config is invalid: {error}\nFix it with --config KEY=VALUE.") from error
