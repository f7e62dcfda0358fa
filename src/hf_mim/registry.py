"""Registration of hf_mim's classes with transformers' Auto classes."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from . import models

# model family -> (config, base model, pre-training model, classification model); None = no such head.
FAMILIES = {
    "mae": (models.MaeConfig, models.MaeModel, models.MaeForPreTraining, models.MaeForImageClassification),
}


def register_auto_classes() -> None:
    for config, base, pretraining, classification in FAMILIES.values():
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, base, exist_ok=True)
        if pretraining is not None:
            AutoModelForPreTraining.register(config, pretraining, exist_ok=True)
        if classification is not None:
            AutoModelForImageClassification.register(config, classification, exist_ok=True)
