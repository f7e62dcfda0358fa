"""The model code of hf_mim. Every file in this folder ships inside saved checkpoints, so they
import only torch, transformers, the standard library and each other (single-dot imports)."""

from .configuration_mae import MaeConfig
from .modeling_mae import MaeForImageClassification, MaeForPreTraining, MaeModel, MaePreTrainedModel

__all__ = ["MaeConfig", "MaeForImageClassification", "MaeForPreTraining", "MaeModel", "MaePreTrainedModel"]
