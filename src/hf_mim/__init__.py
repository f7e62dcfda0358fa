"""hf_mim: masked image modeling (MAE, BEiT, BEiT v2, PeCo, ViT-MPP) for the Hugging Face ecosystem.

Importing the package registers every model, config and image processor with the Auto classes.
"""

from .models import *  # noqa: F403
from .models import __all__ as _model_names
from .registry import register_auto_classes

register_auto_classes()

__version__ = "0.1.0"
__all__ = [*_model_names, "register_auto_classes"]
