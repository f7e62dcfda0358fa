"""One registry: the presets (next to the configs, usable without the training code), the Auto classes
(from each model file's hub_auto_map), the command-line choices and the model cards' method names (from
the method registries) all come from the same declarations."""

from __future__ import annotations

import pkgutil

import pytest
import transformers
from transformers import AutoConfig, AutoModelForPreTraining

from hf_mim import BEiTConfig, MaeConfig, MaeForPreTraining, PecoConfig, VqkdTokenizer, models
from hf_mim.cards import METHODS as CARD_METHODS
from hf_mim.cards import NEEDS_TOKENIZER
from hf_mim.models.presets import from_preset, preset_names
from hf_mim.pretraining import METHODS, build_parser
from hf_mim.registry import model_families
from hf_mim.tokenizer_training import TOKENIZER_METHODS


def test_presets_are_configs_without_the_training_code():
    base = from_preset("mae-base")
    assert type(base) is MaeConfig and base.to_dict() == MaeConfig().to_dict()  # ViT-B/16: MaeConfig's defaults
    demo = from_preset("mae-demo", mask_ratio=0.5)
    assert (demo.image_size, demo.patch_size, demo.hidden_size, demo.mask_ratio) == (32, 4, 128, 0.5)
    assert {"mae-demo", "mae-base", "mae-large", "mae-huge"} == set(preset_names("hf_mim_mae"))
    assert from_preset("beitv2-base").use_cls_pretext_head is True


def test_a_preset_name_of_two_model_types_needs_the_type():
    with pytest.raises(ValueError, match=r"'peco-demo' exists for \['hf_mim_beit', 'hf_mim_peco'\]: pass model_type"):
        from_preset("peco-demo")
    assert type(from_preset("peco-demo", model_type="hf_mim_peco")) is PecoConfig
    assert type(from_preset("peco-demo", model_type="hf_mim_beit")) is BEiTConfig
    with pytest.raises(ValueError, match=r"Unknown preset 'mae-tiny'.*'mae-base'"):
        from_preset("mae-tiny")


def test_auto_classes_come_from_the_models_hub_auto_map():
    families = model_families()
    assert families[MaeConfig]["AutoModelForPreTraining"] is MaeForPreTraining
    assert families[VqkdTokenizer.config_class] == {"AutoModel": VqkdTokenizer}
    # Every model file declares a family and nothing else does: no count to update when a method is added.
    model_files = {info.name for info in pkgutil.iter_modules(models.__path__) if info.name.startswith("modeling_")}
    declaring_files = {cls.__module__.rsplit(".", 1)[-1] for heads in families.values() for cls in heads.values()}
    assert declaring_files == model_files
    for config, heads in families.items():
        assert type(AutoConfig.for_model(config.model_type)) is config
        for auto_name, model_class in heads.items():  # what `import hf_mim` registered
            assert getattr(transformers, auto_name)._model_mapping[config] is model_class
    assert type(AutoModelForPreTraining.from_config(from_preset("mae-demo"))) is MaeForPreTraining


def test_cli_choices_and_card_names_come_from_the_method_registries():
    choices = next(action.choices for action in build_parser()._actions if action.dest == "method")
    assert sorted(choices) == sorted(METHODS) and all(method.name == name for name, method in METHODS.items())
    # The shipped methods are all found (a method module that stopped registering would leave both lists short).
    assert {"beit", "beitv2", "mae", "peco", "vit_mpp"} <= set(METHODS)
    names = {method.card_name or method.name for registry in (METHODS, TOKENIZER_METHODS) for method in registry.values()}
    assert set(CARD_METHODS) == names and CARD_METHODS["peco_tokenizer"] == ("PeCo tokenizer", "tokenizer")
    assert set(NEEDS_TOKENIZER) == {"beit", "beitv2", "peco"}
    classes = [method.__name__ for registry in (METHODS, TOKENIZER_METHODS) for method in registry.values()]
    assert len(classes) == len(set(classes))  # no two method classes share a name


def test_help_of_each_method_says_what_it_does():
    """A method's summary is its line in `pretrain.py --method NAME --help` (as in train_tokenizer.py)."""
    for name, method in METHODS.items():
        assert method.summary and f"--method {name}: {method.summary}" in build_parser(name).format_help()
