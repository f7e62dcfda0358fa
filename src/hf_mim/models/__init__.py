"""The model code of hf_mim. Every file in this folder ships inside saved checkpoints, so they
import only torch, transformers, the standard library and each other (single-dot imports)."""

from .configuration_beit import BEiTConfig
from .configuration_dvae import DvaeConfig
from .configuration_mae import MaeConfig
from .configuration_peco import PecoConfig
from .configuration_vit_mpp import VitMppConfig
from .configuration_vqkd import VqkdConfig
from .image_processing_mim import MimImageProcessor, MimImageProcessorPil
from .modeling_backbone import BEiTBackbone, MaeBackbone, VitMppBackbone
from .modeling_beit import BEiTForImageClassification, BEiTForMaskedImageModeling, BEiTModel, BEiTPreTrainedModel
from .modeling_dvae import DvaeTokenizer
from .modeling_mae import MaeForImageClassification, MaeForPreTraining, MaeModel, MaePreTrainedModel
from .modeling_peco import PecoTokenizer
from .modeling_vit_mpp import VitMppForImageClassification, VitMppForPreTraining, VitMppModel, VitMppPreTrainedModel
from .modeling_vqkd import VqkdTokenizer

__all__ = [
    "BEiTBackbone",
    "BEiTConfig",
    "BEiTForImageClassification",
    "BEiTForMaskedImageModeling",
    "BEiTModel",
    "BEiTPreTrainedModel",
    "DvaeConfig",
    "DvaeTokenizer",
    "MaeBackbone",
    "MaeConfig",
    "MaeForImageClassification",
    "MaeForPreTraining",
    "MaeModel",
    "MaePreTrainedModel",
    "MimImageProcessor",
    "MimImageProcessorPil",
    "VqkdConfig",
    "VqkdTokenizer",
    "VitMppBackbone",
    "VitMppConfig",
    "VitMppForImageClassification",
    "VitMppForPreTraining",
    "VitMppModel",
    "VitMppPreTrainedModel",
    "PecoConfig",
    "PecoTokenizer",
]
