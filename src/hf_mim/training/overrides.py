"""`--config_overrides "hidden_size=192,num_hidden_layers=6,image_size=(32, 32)"` -> a dict."""

from __future__ import annotations

from ..convert.common import parse_overrides


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split on `separator` outside brackets, so tuple and list values keep their commas."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def apply_config_overrides(text: str | None) -> dict:
    """Parsed `KEY=VALUE[,KEY=VALUE...]` (values are Python literals, true/false, none or strings)."""
    if not text:
        return {}
    try:
        return parse_overrides(split_top_level(text))
    except ValueError as error:
        raise ValueError(f"--config_overrides: {error} Example: --config_overrides \"hidden_size=192,mask_ratio=0.6\".") from None
