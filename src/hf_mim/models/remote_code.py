"""Makes every saved checkpoint loadable with ``trust_remote_code=True`` where hf_mim is not installed.

``save_pretrained`` copies the model's file and its sibling imports flat into the checkpoint
(transformers does that for classes with an ``_auto_class``) and writes ``config.auto_map`` for
every head of the model family, not only the class that was saved, so ``AutoModel``,
``AutoModelForPreTraining`` and ``AutoModelForImageClassification`` all resolve.
"""

from __future__ import annotations

import os


class HubCodeMixin:
    # auto class -> "module.Class" for every head of the family; set by each model family.
    hub_auto_map: dict[str, str] = {}

    def save_pretrained(self, save_directory, *args, **kwargs):
        cls = type(self)
        if cls._auto_class is None:  # transformers copies the code only for registered classes
            cls.register_for_auto_class(
                next((auto for auto, target in self.hub_auto_map.items() if target.endswith("." + cls.__name__)),
                     "AutoModel")
            )
        config_class = type(self.config)
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(self.hub_auto_map)
        auto_map["AutoConfig"] = f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}"
        self.config.auto_map = dict(auto_map)  # a copy: transformers edits it in place below
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self.config.auto_map != auto_map and kwargs.get("is_main_process", True):
            # transformers records any class named "...Tokenizer" as a (slow, fast) text-tokenizer pair,
            # which AutoModel cannot load (our visual tokenizers): write the plain map again.
            self.config.auto_map = auto_map
            self.config.to_json_file(os.path.join(save_directory, "config.json"))
        return result
