"""DALL-E dVAE (BEiT v1's tokenizer) -> hf_mim ``DvaeTokenizer`` directory.

SRC is the encoder, either
  * a transformers ``FlavaImageCodebook`` directory (save_pretrained output): the same encoder with
    ``.group.``/``.path.`` module levels and ``weight``/``bias`` names;
  * the reference encoder of openai/DALL-E: the published ``encoder.pkl`` (a pickled
    ``dall_e.encoder.Encoder`` with parameters ``.w``/``.b``), or a state dict with those names as
    ``.safetensors`` or a plain ``.pth`` (read with weights_only, no code runs).
--decoder adds the reference decoder (``decoder.pkl`` or a state dict with its names). Without it
the tokenizer is saved with ``with_decoder=False``: tokenizing works, ``decode`` and training raise.

Loading a pickle runs code from the file. ``encoder.pkl``/``decoder.pkl`` therefore need
--allow-pickle, and the ``dall_e`` package for the pickled classes (pip install DALL-E). Prefer
converting once and sharing the saved safetensors directory.

The weights give vocab_size, hidden_size, num_groups, num_blocks_per_group, input_channels and the
decoder widths. ``reference_fp16`` defaults to true: the published code's fp16 convolutions on
CUDA, which produced BEiT's targets; --config reference_fp16=false gives fp32 (the reference on
CPU, and FlavaImageCodebook). BEiT pre-training keeps the saved choice by default
(``--tokenizer_precision reference``) and logs it; its fp32 / bf16 / fp16 options override it. Any
DvaeConfig field can be set with --config KEY=VALUE; a value the weights contradict is an error.
"""

from __future__ import annotations

import os
import re

import torch
from huggingface_hub.errors import StrictDataclassError

from ..models import DvaeConfig, DvaeTokenizer
from .common import (
    check_config_fields, check_transformers_dir, is_transformers_dir, load_reference_state_dict,
    load_transformers_state_dict, parse_overrides, read_model_type, save_converted,
)

NAME = "dalle"
HELP = "DALL-E dVAE: FlavaImageCodebook directory or openai/DALL-E encoder (+ --decoder) -> DvaeTokenizer"
PICKLE_HINT = ("The published encoder.pkl / decoder.pkl pickle whole modules: with --allow-pickle (which runs code "
               "from the file) they also need the dall_e package, pip install DALL-E.")


def add_arguments(parser) -> None:
    parser.add_argument("--decoder", metavar="PATH",
                        help="the reference decoder: decoder.pkl (needs --allow-pickle) or a state dict with its "
                             ".w/.b names; without it the tokenizer cannot decode")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle encoder.pkl / decoder.pkl: this RUNS CODE from the files (only for files you "
                             "trust) and needs the dall_e package (pip install DALL-E)")


def convert(args):
    overrides = parse_overrides(args.config)
    check_config_fields(overrides, DvaeConfig)
    if os.path.isdir(args.src):
        encoder = read_flava_dir(args.src)
    else:
        encoder = read_reference_file(args.src, args.allow_pickle)
    check_kind(encoder, "encoder", args.src)
    decoder = None
    if args.decoder:
        decoder = read_reference_file(args.decoder, args.allow_pickle)
        check_kind(decoder, "decoder", args.decoder)
    config = build_config(encoder, decoder, overrides)
    model = DvaeTokenizer(config)
    weights = {f"encoder.{k}": v for k, v in encoder.items()}
    weights.update({f"decoder.{k}": v for k, v in (decoder or {}).items()})
    save_converted(model, weights, args.out)
    return model


# ---------------------------------------------------------------------------------------------
# Reading the sources; every reader returns reference module names with weight/bias
# ---------------------------------------------------------------------------------------------


def read_flava_dir(path: str) -> dict[str, torch.Tensor]:
    if is_transformers_dir(path) and read_model_type(path) == "flava":
        raise ValueError(f"{path} is a whole FLAVA model. Save its codebook first: FlavaForPreTraining."
                         "from_pretrained(SRC).image_codebook.save_pretrained(DIR), then convert DIR.")
    check_transformers_dir(path, expected="flava_image_codebook", hf_mim_type=DvaeConfig.model_type,
                           what="FlavaImageCodebook", reads="FlavaImageCodebook")
    # blocks.group_1.group.block_1.res_path.path.conv_1.weight -> blocks.group_1.block_1.res_path.conv_1.weight
    return {re.sub(r"\.(group|path)\.", ".", key): value for key, value in load_transformers_state_dict(path).items()}


def read_reference_file(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A reference encoder/decoder file -> state dict with ``.w``/``.b`` renamed to ``weight``/``bias``."""
    if allow_pickle and not path.endswith(".safetensors"):
        state_dict = unpickle_state_dict(path)
    else:
        try:
            state_dict = load_reference_state_dict(path)
        except ValueError as error:
            if "--allow-pickle" in str(error):
                raise ValueError(f"{error} {PICKLE_HINT}") from error
            raise
    return {re.sub(r"\.b$", ".bias", re.sub(r"\.w$", ".weight", key)): value for key, value in state_dict.items()}


def unpickle_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Unpickle (runs code from the file!) a whole module, as the published .pkl files are, or a checkpoint dict."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as error:
        raise ValueError(f"{path} pickles classes of the module {error.name!r}, which cannot be imported. "
                         f"{PICKLE_HINT}") from error
    if isinstance(loaded, torch.nn.Module):
        return loaded.state_dict()
    return load_reference_state_dict(path, allow_pickle=True)  # a checkpoint dict: unwrap as usual


def check_kind(state_dict: dict, expected: str, path: str) -> None:
    """The encoder starts with a 7x7 conv from pixels, the decoder with a 1x1 conv from the codes."""
    first = state_dict.get("blocks.input.weight")
    if first is None or first.ndim != 4 or "blocks.output.conv.weight" not in state_dict:
        raise ValueError(f"{path} is not a DALL-E encoder or decoder: it lacks blocks.input.w / "
                         f"blocks.output.conv.w (found keys such as {sorted(state_dict)[:6]}).")
    kind = {7: "encoder", 1: "decoder"}.get(first.shape[-1], "unknown")
    if kind != expected:
        where = "as SRC" if expected == "encoder" else "with --decoder"
        raise ValueError(f"{path} looks like a DALL-E {kind} (first conv {list(first.shape)}), but was given {where}. "
                         "Pass the encoder (encoder.pkl, or a FlavaImageCodebook directory) as SRC and the decoder "
                         "(decoder.pkl) with --decoder.")


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------


def count_numbered(state_dict: dict, prefix: str) -> int:
    """Highest N among keys ``prefixN.``: the reference numbers groups and blocks from 1."""
    numbers = [int(m[1]) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(numbers, default=0)


def encoder_fields(state_dict: dict) -> dict:
    width, channels = state_dict["blocks.input.weight"].shape[:2]
    return {
        "hidden_size": width,
        "input_channels": channels,
        "vocab_size": state_dict["blocks.output.conv.weight"].shape[0],
        "num_groups": count_numbered(state_dict, "blocks.group_"),
        "num_blocks_per_group": count_numbered(state_dict, "blocks.group_1.block_"),
    }


def decoder_fields(state_dict: dict, encoder: dict) -> dict:
    init_size, vocab = state_dict["blocks.input.weight"].shape[:2]
    out_channels, hidden = state_dict["blocks.output.conv.weight"].shape[:2]
    groups = count_numbered(state_dict, "blocks.group_")
    for name, found, wanted in (("vocab_size", vocab, encoder["vocab_size"]),
                                ("number of groups", groups, encoder["num_groups"]),
                                ("output channels", out_channels, 2 * encoder["input_channels"])):
        if found != wanted:
            raise ValueError(f"The decoder does not fit the encoder: {name} {found}, expected {wanted}. "
                             "Are they from the same dVAE?")
    return {
        "decoder_init_size": init_size,
        "decoder_hidden_size": hidden,
        "decoder_num_blocks_per_group": count_numbered(state_dict, "blocks.group_1.block_"),
    }


def build_config(encoder: dict, decoder: dict | None, overrides: dict) -> DvaeConfig:
    from_weights = encoder_fields(encoder)
    if decoder is not None:
        from_weights.update(decoder_fields(decoder, from_weights))
    from_weights["with_decoder"] = decoder is not None
    for name, value in from_weights.items():
        if name in overrides and overrides[name] != value:
            hint = " Pass the decoder with --decoder." if name == "with_decoder" else ""
            raise ValueError(f"--config sets {name}={overrides[name]!r} but the weights have {name}={value!r}.{hint}")
    try:
        return DvaeConfig(**{"reference_fp16": True, **overrides, **from_weights})
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise ValueError(f"The converted config is invalid: {error}\nFix it with --config KEY=VALUE.") from error
