"""Registration of hf_mim's classes with transformers' Auto classes."""

from __future__ import annotations

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from . import models

# model family -> (config, base model, pre-training model, classification model); None = no such head.
FAMILIES = {
    "mae": (models.MaeConfig, models.MaeModel, models.MaeForPreTraining, models.MaeForImageClassification),
    "dvae": (models.DvaeConfig, models.DvaeTokenizer, None, None),
    "beit": (models.BEiTConfig, models.BEiTModel, models.BEiTForMaskedImageModeling, models.BEiTForImageClassification),
    "vqkd": (models.VqkdConfig, models.VqkdTokenizer, None, None),
    "vit_mpp": (
        models.VitMppConfig, models.VitMppModel, models.VitMppForPreTraining, models.VitMppForImageClassification,
    ),
    "peco": (models.PecoConfig, models.PecoTokenizer, None, None),
}
# Encoders that also serve as backbones for dense tasks (AutoBackbone, UperNet / DPT `backbone_config`).
BACKBONES = {models.MaeConfig: models.MaeBackbone, models.BEiTConfig: models.BEiTBackbone,
             models.VitMppConfig: models.VitMppBackbone}


def register_auto_classes() -> None:
    for config, base, pretraining, classification in FAMILIES.values():
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, base, exist_ok=True)
        if pretraining is not None:
            AutoModelForPreTraining.register(config, pretraining, exist_ok=True)
        if classification is not None:
            AutoModelForImageClassification.register(config, classification, exist_ok=True)
    for config, backbone in BACKBONES.items():
        AutoBackbone.register(config, backbone, exist_ok=True)
    # One image processor (two backends) serves every family; a fresh dict each, as transformers updates it in place.
    for config, *_ in FAMILIES.values():
        AutoImageProcessor.register(
            config,
            image_processor_classes={"torchvision": models.MimImageProcessor, "pil": models.MimImageProcessorPil},
            exist_ok=True,
        )
