"""Registration of hf_mim's classes with transformers' Auto classes.

The families are read from the models themselves: each `models/modeling_*.py` declares, on its model
classes, the `hub_auto_map` that saved checkpoints carry (Auto class -> "module.Class"); the same map
registers the classes here (AutoBackbone too: the backbones add it to their map). A new model file therefore
registers itself (README, "Adding a method").
"""

from __future__ import annotations

import importlib
import pkgutil

import transformers
from transformers import AutoConfig, AutoImageProcessor

from . import models


def model_families() -> dict[type, dict[str, type]]:
    """config class -> {Auto class name: model class}, from the `hub_auto_map` of every modeling module."""
    families: dict[type, dict[str, type]] = {}
    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda info: info.name):
        if not info.name.startswith("modeling_"):
            continue
        module = importlib.import_module(f"{models.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == module.__name__ and "hub_auto_map" in vars(value):
                families.setdefault(value.config_class, {}).update(
                    {auto: resolve(target) for auto, target in value.hub_auto_map.items()})
    return families


def resolve(target: str) -> type:
    """"modeling_mae.MaeModel" -> the class (the module named in the map, which need not be the declaring one)."""
    module_name, class_name = target.rsplit(".", 1)
    return getattr(importlib.import_module(f"{models.__name__}.{module_name}"), class_name)


# model family -> (config, base model, pre-training model, classification model); None = no such head.
FAMILIES = {
    config.model_type.removeprefix("hf_mim_"): (config, heads.get("AutoModel"), heads.get("AutoModelForPreTraining"),
                                                heads.get("AutoModelForImageClassification"))
    for config, heads in model_families().items()
}


def register_auto_classes() -> None:
    for config, heads in model_families().items():
        AutoConfig.register(config.model_type, config, exist_ok=True)
        for auto_name, model_class in heads.items():
            getattr(transformers, auto_name).register(config, model_class, exist_ok=True)
    # One image processor (two backends) serves every family; a fresh dict each, as transformers updates it in place.
    for config in model_families():
        AutoImageProcessor.register(
            config,
            image_processor_classes={"torchvision": models.MimImageProcessor, "pil": models.MimImageProcessorPil},
            exist_ok=True,
        )
