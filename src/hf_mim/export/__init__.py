"""Exports of hf_mim checkpoints to timm and to transformers' own classes (``python -m hf_mim.export``)."""

from .common import ExportError

__all__ = ["ExportError"]
