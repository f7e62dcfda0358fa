"""Helpers shared by every converter: reading checkpoints, config overrides, key mapping."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import re
from collections.abc import Iterable

import torch


def parse_overrides(pairs: Iterable[str]) -> dict:
    """``["mask_ratio=0.6", "norm_pix_loss=true"]`` -> ``{"mask_ratio": 0.6, "norm_pix_loss": True}``."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config takes KEY=VALUE pairs, got {pair!r}.")
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            value = lowered == "true"
        elif lowered in ("none", "null"):
            value = None
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        overrides[key.strip()] = value
    return overrides


def check_config_fields(overrides: dict, config_class: type, extra: Iterable[str] = ()) -> None:
    """Every ``--config`` key must be a field of `config_class` (or one of `extra`)."""
    known = {field.name for field in dataclasses.fields(config_class)} | set(extra)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"--config: {unknown} are not {config_class.__name__} fields. Known fields: {sorted(known)}.")


def rename_keys(state_dict: dict, mapping: list[tuple[str, str]], prefix: str, what: str) -> dict:
    """Rename each key by the first ``(pattern, replacement)`` of `mapping` that matches it whole;
    ``{prefix}`` in a replacement becomes `prefix` (e.g. ``"beit."`` inside a head model). A key that
    no pattern matches is an error naming `what` the checkpoint should have been."""
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, replacement in mapping:
            if re.fullmatch(pattern, key):
                renamed[re.sub(pattern, replacement.replace("{prefix}", prefix), key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Keys that are not part of {what} model: {sorted(unknown)[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}. Is this {what} checkpoint?")
    return renamed


def save_converted(model: torch.nn.Module, weights: dict, out: str) -> torch.nn.Module:
    """Load `weights` strictly into `model` and ``save_pretrained`` it (in eval mode) to `out`."""
    try:
        load_into(model, weights)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"The weights do not fit the config: {error}") from error
    model.eval()
    model.save_pretrained(out)
    return model


def load_reference_state_dict(path: str, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a reference ``.pth``/``.safetensors`` checkpoint and unwrap ``{'model'|'module'|'state_dict': ...}``.

    ``.pth`` files are read with ``weights_only=True`` (no code runs); ``allow_pickle`` lifts that
    for checkpoints that pickle whole objects, which runs code from the file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # SafetensorError, or OSError for a file cut short
            raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}). It is "
                             "damaged or truncated: download it again.") from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as error:  # torch raises UnpicklingError subclasses and RuntimeErrors here
        if allow_pickle or not pickles_objects(error):
            raise ValueError(f"{path} is damaged or not a PyTorch checkpoint ({type(error).__name__}: "
                             f"{first_line(error)}). Download it again, or check the path.") from error
        raise ValueError(
            f"{path} pickles Python objects besides tensors ({unsupported_global(error)}). If you trust the file, "
            "re-run with --allow-pickle (loading a pickle runs code from it)."
        ) from error
    for key in ("model", "module", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return checkpoint


def pickles_objects(error: Exception) -> bool:
    """torch.load(weights_only=True) refused a readable pickle for its objects: --allow-pickle would load it.
    Anything else (a truncated archive, random bytes, a text file) is damage that no option fixes."""
    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error) and \
        "Unsupported global" in str(error)


def unsupported_global(error: Exception) -> str:
    """torch's line naming the refused class, e.g. "Unsupported global: GLOBAL argparse.Namespace"."""
    found = re.search(r"Unsupported global: GLOBAL \S+", str(error))
    return found.group(0) if found else "objects that weights_only cannot load"


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def is_transformers_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def read_model_type(path: str) -> str | None:
    with open(os.path.join(path, "config.json")) as handle:
        return json.load(handle).get("model_type")


def check_transformers_dir(path: str, *, expected: str, hf_mim_type: str, what: str, reads: str) -> None:
    """`path` must be a transformers ``save_pretrained`` directory of model_type `expected`. `what` names the
    expected model in the errors, `reads` the classes the converter reads; an hf_mim directory of
    `hf_mim_type` needs no conversion."""
    if not is_transformers_dir(path):
        raise ValueError(f"{path} is a directory without config.json: expected a transformers {what} directory "
                         "(save_pretrained output) or a reference checkpoint file.")
    model_type = read_model_type(path)
    if model_type == hf_mim_type:
        raise ValueError(f"{path} already is an hf_mim directory (model_type {hf_mim_type!r}): load it with "
                         "from_pretrained instead.")
    if model_type != expected:
        raise ValueError(f"{path} holds a transformers model of model_type {model_type!r}, not {expected!r}. "
                         f"This converter reads {reads} directories.")


def substitute_keys(state_dict: dict, substitutions: Iterable[tuple[str, str]]) -> dict:
    """Every key with each ``(pattern, replacement)`` applied in turn (``re.sub``; unlike `rename_keys`,
    keys that no pattern matches are kept as they are)."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in substitutions:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def count_indexed(state_dict: dict, prefix: str) -> int:
    """Number of ``prefix.N.`` entries, e.g. blocks in ``blocks.N.``."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def load_into(model: torch.nn.Module, state_dict: dict, *, ignore: Iterable[str] = ()) -> None:
    """Strict load that names every missing and unexpected key in one clear error."""
    ignore = tuple(ignore)
    state_dict = {k: v for k, v in state_dict.items() if not any(token in k for token in ignore)}
    persistent = set(model.state_dict())
    missing = sorted(persistent - set(state_dict))
    unexpected = sorted(set(state_dict) - persistent)
    if missing or unexpected:
        raise ValueError(
            "The checkpoint does not match the model: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
            "Is it a checkpoint of the method you named?"
        )
    model.load_state_dict(state_dict, strict=True)


def load_transformers_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights of a transformers ``save_pretrained`` directory, with the names as stored.

    Reads ``model.safetensors`` (also sharded, through its ``.index.json``) or the older
    ``pytorch_model.bin`` (with ``weights_only=True``).
    """
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(load_reference_state_dict(os.path.join(path, shard)))
        return state_dict
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return load_reference_state_dict(os.path.join(path, name))
    raise FileNotFoundError(
        f"{path} has a config.json but no weights (model.safetensors, its .index.json, or pytorch_model.bin)."
    )
