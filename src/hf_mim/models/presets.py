"""Named architectures (`mae-base`, `beit-large`, `vqkd-demo`, ...), usable without the training code.

Each `configuration_*.py` keeps its presets next to its config class, in a module-level `PRESETS`
dict (name -> config fields); this module gathers them:

```python
>>> from hf_mim.models.presets import from_preset, preset_names
>>> config = from_preset("mae-base")                  # a MaeConfig, ViT-B/16
>>> preset_names("hf_mim_beit")                       # ['beit-base', 'beit-demo', ...]
>>> from_preset("peco-demo", model_type="hf_mim_peco")  # the PeCo tokenizer (the name also is a BEiT one)
```

A preset name is `<method>-<size>`; the same name may exist for two model types (`peco-demo` is both
the PeCo pre-training model and the PeCo tokenizer), then `model_type` picks one.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from transformers import PreTrainedConfig


def config_class_of(module) -> type[PreTrainedConfig] | None:
    """The model config defined in a configuration module (the class with a model_type)."""
    classes = [value for value in vars(module).values() if isinstance(value, type)
               and issubclass(value, PreTrainedConfig) and value.__module__ == module.__name__
               and getattr(value, "model_type", "")]
    return classes[0] if len(classes) == 1 else None


@cache
def all_presets() -> dict[str, dict[str, tuple[type[PreTrainedConfig], dict]]]:
    """model_type -> {preset name: (config class, fields)}, from every configuration module's PRESETS."""
    table: dict[str, dict[str, tuple[type, dict]]] = {}
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("configuration_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        config_class, presets = config_class_of(module), getattr(module, "PRESETS", None)
        if config_class is not None and presets:
            table[config_class.model_type] = {name: (config_class, fields) for name, fields in presets.items()}
    return table


def preset_names(model_type: str | None = None) -> list[str]:
    """The preset names of one model type, or of all."""
    table = all_presets()
    types = [model_type] if model_type is not None else list(table)
    return sorted({name for kind in types for name in table.get(kind, {})})


def preset_fields(name: str, model_type: str | None = None) -> tuple[type[PreTrainedConfig], dict]:
    """(config class, fields) of a preset; `model_type` is needed only when two model types share the name."""
    matches = {kind: presets[name] for kind, presets in all_presets().items()
               if name in presets and model_type in (None, kind)}
    if not matches:
        scope = f" for {model_type}" if model_type else ""
        raise ValueError(f"Unknown preset {name!r}{scope}; presets: {preset_names(model_type)}.")
    if len(matches) > 1:
        raise ValueError(f"The preset {name!r} exists for {sorted(matches)}: pass model_type=... to pick one.")
    config_class, fields = next(iter(matches.values()))
    return config_class, dict(fields)


def from_preset(name: str, model_type: str | None = None, **overrides) -> PreTrainedConfig:
    """The config of a named architecture, with `overrides` applied (validated like any config)."""
    config_class, fields = preset_fields(name, model_type)
    return config_class(**{**fields, **overrides})


__all__ = ["from_preset", "preset_fields", "preset_names"]
