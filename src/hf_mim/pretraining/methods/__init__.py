"""The masked-image-modeling methods, one file each; importing this package registers every one of them
in :data:`METHODS` (pretrain.py's `--method`).

Each is a :class:`hf_mim.training.TrainingMethod`, the engine's interface; `masked_prediction.py` and
`token_targets.py` hold what the masked-patch classification methods share. A new method is one more
file here that registers itself (README, "Adding a method"): it is found and imported below.
"""

import importlib
import pkgutil

from ...cli import option
from ...training.method import (
    CropOptions, MethodRegistry, NoOptions, TrainingMethod, crop_and_flip, processor_pixels, training_augmentation,
)

METHODS = MethodRegistry()
register_method, get_method = METHODS.register, METHODS.lookup

SHARED_MODULES = {"masked_prediction", "token_targets"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "CropOptions", "MethodRegistry", "NoOptions", "TrainingMethod",
           "crop_and_flip", "get_method", "option", "processor_pixels", "register_method", "training_augmentation"]
