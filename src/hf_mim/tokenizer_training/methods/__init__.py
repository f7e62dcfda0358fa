"""The visual-tokenizer training methods, one file each; importing this package registers every one of them
in :data:`TOKENIZER_METHODS` (`base.py` holds what they share)."""

import importlib
import pkgutil

from .base import TOKENIZER_METHODS, TokenizerMethod, codebook_fingerprint, get_tokenizer_method
from .base import register_tokenizer_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TOKENIZER_METHODS", "TokenizerMethod", "codebook_fingerprint", "get_tokenizer_method",
           "register_tokenizer_method"]
