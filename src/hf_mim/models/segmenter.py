"""UperNet on an hf_mim backbone, saved so that it loads where hf_mim is not installed.

transformers' own `UperNetConfig` rebuilds its `backbone_config` through transformers' table of model
types, which knows `hf_mim_mae` only after `import hf_mim`; and `UperNetForSemanticSegmentation`
builds its backbone through `AutoBackbone`, likewise. These two subclasses resolve the backbone from
hf_mim's own classes instead, and ship with the checkpoint (``trust_remote_code=True``), so
`AutoModelForSemanticSegmentation.from_pretrained(dir, trust_remote_code=True)` works anywhere and
transformers' `run_semantic_segmentation.py` can load one. The saved `config.json` keeps
`model_type: "upernet"`, so with hf_mim installed transformers' own class loads it too.

Not a model family (no `modeling_` prefix): `hf_mim.registry` registers the families' own model types, and
`upernet` stays transformers'.
"""

from __future__ import annotations

from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from .modeling_backbone import BEiTBackbone, MaeBackbone, VitMppBackbone
from .remote_code import HubCodeMixin

BACKBONES = {backbone.config_class.model_type: backbone for backbone in (MaeBackbone, BEiTBackbone, VitMppBackbone)}


def backbone_config_from_dict(backbone_config):
    """A saved backbone config (a dict) of an hf_mim family -> its config object; anything else unchanged."""
    if isinstance(backbone_config, dict) and backbone_config.get("model_type") in BACKBONES:
        config_class = BACKBONES[backbone_config["model_type"]].config_class
        fields = {key: value for key, value in backbone_config.items() if key != "model_type"}
        return config_class(**fields)
    return backbone_config


class MimUperNetConfig(UperNetConfig):
    """`UperNetConfig` whose `backbone_config` may be an hf_mim encoder's, with or without hf_mim installed."""

    def __post_init__(self, **kwargs):
        self.backbone_config = backbone_config_from_dict(self.backbone_config)
        super().__post_init__(**kwargs)


class MimUperNetForSemanticSegmentation(HubCodeMixin, UperNetForSemanticSegmentation):
    config_class = MimUperNetConfig
    hub_auto_map = {"AutoModelForSemanticSegmentation": "segmenter.MimUperNetForSemanticSegmentation"}

    def __init__(self, config):
        # UperNet builds its backbone with AutoBackbone.from_config: make the shipped classes known to it,
        # keyed by these class objects (an installed hf_mim's own registration is left as it is).
        for backbone_class in BACKBONES.values():
            AutoBackbone.register(backbone_class.config_class, backbone_class, exist_ok=True)
        super().__init__(config)


__all__ = ["MimUperNetConfig", "MimUperNetForSemanticSegmentation"]
