"""The pre-training methods, one file each; importing this package registers every one of them.

`base.py` is the interface and the registry (:data:`METHODS`); `masked_prediction.py` and
`token_targets.py` hold what the masked-patch classification methods share. A new method is one more
file here that registers itself (README, "Adding a method"): it is found and imported below.
"""

import importlib
import pkgutil

from .base import METHODS, CropOptions, MethodRegistry, NoOptions, PretrainingMethod, crop_and_flip, get_method
from .base import option, processor_pixels, register_method, training_augmentation

SHARED_MODULES = {"base", "masked_prediction", "token_targets"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "CropOptions", "MethodRegistry", "NoOptions", "PretrainingMethod", "crop_and_flip",
           "get_method", "option", "processor_pixels", "register_method", "training_augmentation"]
