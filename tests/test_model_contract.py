"""The contract every hf_mim encoder family keeps, over `registry.model_families()` (no list of families here),
and over a throwaway method added in a temporary package: the shared encoder lets a new method be a
config and a short model file, which the registries pick up as they are.

The contract, per head: tuples with return_dict=False; attention maps (each block's softmax) with
output_attentions, by argument or config, equal to rounding to the outputs without them; hidden states;
unknown keywords refused; the Auto classes registered and a save / load round trip through them.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

import hf_mim.models as models
from hf_mim.models import masking, presets
from hf_mim.models.encoder import VitEncoderMixin
from hf_mim.registry import model_families, register_auto_classes

from transformers_common import (
    FAMILIES_NOT_RUN, HEADS, FamilyModelTester, deterministic_config, encoder_families, head_inputs,
)


def heads_of(families: dict) -> list:
    return [pytest.param(config, heads[auto], id=heads[auto].__name__)
            for config, heads in families.items() for auto in HEADS if auto in heads]


def tiny_head(config_class, model_class):
    tester = FamilyModelTester(None, config_class, model_class, deterministic_config(config_class))
    config, inputs = tester.prepare_config_and_inputs_for_common()
    inputs.update(head_inputs(model_class, tester, inputs, return_labels=True))
    torch.manual_seed(0)
    return model_class(config).eval(), inputs, tester


def check_contract(config_class, model_class, tmp_path) -> None:
    model, inputs, tester = tiny_head(config_class, model_class)
    with torch.no_grad():
        plain = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        maps = model(**inputs, output_attentions=True, output_hidden_states=True)
    first = next(value for value in plain.values())
    assert type(as_tuple) is tuple and torch.equal(as_tuple[0], first)
    assert plain.attentions is None
    tokens = tester.seq_length
    assert len(maps.attentions) == tester.num_hidden_layers and len(maps.hidden_states) == tester.num_hidden_layers + 1
    for attention in maps.attentions:
        assert attention.shape == (tester.batch_size, tester.num_attention_heads, tokens, tokens)
        assert bool((attention >= 0).all())
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    # The maps need the eager kernel; the outputs stay those of the fast one to rounding.
    torch.testing.assert_close(next(value for value in maps.values()), first, rtol=1e-5, atol=1e-5)
    model.set_attn_implementation("eager")  # transformers allows the config path with the eager kernel only
    model.config.output_attentions = True
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).attentions, maps.attentions)
    model.config.output_attentions = False
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        model(**inputs, output_attention=True)  # a typo is an error, never silently ignored
    auto_name = next(auto for auto, cls in model_families()[config_class].items() if cls is model_class)
    model.save_pretrained(tmp_path / model_class.__name__)
    loaded = getattr(transformers, auto_name).from_pretrained(tmp_path / model_class.__name__).eval()
    assert type(loaded) is model_class
    with torch.no_grad():
        torch.testing.assert_close(next(value for value in loaded(**inputs).values()), first)


@pytest.mark.parametrize(("config_class", "model_class"), heads_of(encoder_families()))
def test_every_head_keeps_the_contract(config_class, model_class, tmp_path, single_torch_thread):
    check_contract(config_class, model_class, tmp_path)


def test_every_encoder_family_has_a_base_model_and_a_pretraining_head():
    families = encoder_families()
    assert families, "no encoder family found: model_families() reads hf_mim/models/modeling_*.py"
    others = {config.model_type for config in model_families()} - {config.model_type for config in families}
    assert others == set(FAMILIES_NOT_RUN), "a family is neither under the contract nor listed with its reason"
    for config_class, heads in families.items():
        assert issubclass(heads["AutoModel"], VitEncoderMixin) and "AutoModelForPreTraining" in heads, config_class


def test_vit_mpp_takes_the_shared_mask_name_and_refuses_the_old_one():
    model, inputs, _ = tiny_head(models.VitMppConfig, models.VitMppModel)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True
    with torch.no_grad():
        corrupted = model(inputs["pixel_values"], bool_masked_pos=mask)
    assert (corrupted.corruption_branch[:, :4] != masking.NOT_CORRUPTED).all()
    assert (corrupted.corruption_branch[:, 4:] == masking.NOT_CORRUPTED).all()
    with pytest.raises(TypeError, match="no longer takes `corrupt_mask`: pass the same mask as `bool_masked_pos`"):
        model(inputs["pixel_values"], corrupt_mask=mask)


def test_base_models_refuse_unknown_keywords_and_classifiers_take_the_trainers():
    beit, inputs, _ = tiny_head(models.BEiTConfig, models.BEiTModel)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bool_masked_position'"):
        beit(**inputs, bool_masked_position=torch.zeros(2, 16, dtype=torch.bool))
    classifier, inputs, _ = tiny_head(models.MaeConfig, models.MaeForImageClassification)
    assert classifier(**inputs, num_items_in_batch=torch.tensor(2)).loss is not None  # what Trainer passes
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['lables'\]"):
        classifier(inputs["pixel_values"], lables=inputs["labels"])


def test_a_plain_trainer_scales_the_classifiers_batch_mean_loss_for_gradient_accumulation(tmp_path):
    """The classifiers take **kwargs (the Trainer's `num_items_in_batch`) but return a batch-mean loss: a plain
    transformers Trainer must not read the **kwargs as a loss normalised by `num_items_in_batch`, or it leaves
    the loss undivided by the gradient-accumulation steps (gradients G times too large)."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          gradient_accumulation_steps=4)
    classifiers = [(config_class, heads["AutoModelForImageClassification"])
                   for config_class, heads in encoder_families().items() if "AutoModelForImageClassification" in heads]
    assert classifiers
    for config_class, model_class in classifiers:
        classifier, _, _ = tiny_head(config_class, model_class)
        trainer = transformers.Trainer(model=classifier, args=args)
        assert trainer.model_accepts_loss_kwargs is False, model_class.__name__


def test_the_shared_encoder_refuses_a_masking_input_it_would_ignore_and_unknown_choices():
    mae, inputs, _ = tiny_head(models.MaeConfig, models.MaeModel)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="drops the masked patches: pass `ids_keep`"):
        mae.encode(inputs["pixel_values"], mask=mask)
    beit, _, _ = tiny_head(models.BEiTConfig, models.BEiTModel)
    with pytest.raises(ValueError, match="masks by 'replace', not by dropping patches"):
        beit.encode(inputs["pixel_values"], ids_keep=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Unknown position scheme 'rope'; choose one of \['sincos', 'learned'"):
        beit.build_embeddings(beit.config, position_scheme="rope", masking_mode="replace")


# ---------------------------------------------------------------------------------------------
# A throwaway method in a temporary package: SimMIM-like (learned positions, mask-token replacement,
# a linear pixel head with an L1 loss on the masked patches) with its own mask generator.
# ---------------------------------------------------------------------------------------------

TOY_CONFIG = '''
from huggingface_hub.dataclasses import strict

from .configuration_vit import VitBackboneConfig


@strict
class ToyMimConfig(VitBackboneConfig):
    model_type = "hf_mim_toymim"
    use_mean_pooling: bool = True


PRESETS = {"toymim-demo": dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)}
'''

TOY_MODEL = '''
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedImageModelingOutput

from .classification import ImageClassificationMixin, pool_tokens
from .configuration_toymim import ToyMimConfig
from .encoder import VitEncoderMixin, VitPreTrainedModel
from .inputs import check_bool_masked_pos
from .masking import RandomMaskGenerator, register_mask_generator
from .vit_core import Block, patchify


@register_mask_generator("toymim_random")
class ToyMaskGenerator(RandomMaskGenerator):
    pass


class ToyMimPreTrainedModel(VitPreTrainedModel):
    hub_auto_map = {"AutoModel": "modeling_toymim.ToyMimModel",
                    "AutoModelForPreTraining": "modeling_toymim.ToyMimForPreTraining",
                    "AutoModelForImageClassification": "modeling_toymim.ToyMimForImageClassification"}
    config_class = ToyMimConfig
    base_model_prefix = "vit"
    _no_split_modules = ["Block"]


class ToyMimModel(VitEncoderMixin, ToyMimPreTrainedModel):
    def __init__(self, config, use_final_norm=True):
        super().__init__(config)
        self.build_embeddings(config, position_scheme="learned", masking_mode="replace")
        blocks = nn.ModuleList(Block(config, config.hidden_size, config.num_attention_heads, config.intermediate_size)
                               for _ in range(config.num_hidden_layers))
        self.build_trunk(blocks, nn.LayerNorm(config.hidden_size) if use_final_norm else None)
        self.post_init()

    def forward(self, pixel_values, bool_masked_pos=None, output_hidden_states=None, output_attentions=None,
                return_dict=None):
        mask = None
        if bool_masked_pos is not None:
            grid = self.patch_embed.grid_size(pixel_values)
            mask = check_bool_masked_pos(bool_masked_pos, pixel_values.shape[0], grid)
        encoded = self.encode(pixel_values, mask=mask, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions)
        output = BaseModelOutputWithPooling(
            last_hidden_state=encoded.last_hidden_state, hidden_states=encoded.hidden_states,
            attentions=encoded.attentions, pooler_output=pool_tokens(encoded.last_hidden_state, True))
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class ToyMimForPreTraining(ToyMimPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vit = ToyMimModel(config)
        self.pixel_head = nn.Linear(config.hidden_size, config.patch_size ** 2 * config.num_channels)
        self.post_init()

    def forward(self, pixel_values, bool_masked_pos=None, labels=None, output_hidden_states=None,
                output_attentions=None, return_dict=None):
        encoded = self.vit(pixel_values, bool_masked_pos, output_hidden_states, output_attentions, return_dict=True)
        prediction = self.pixel_head(encoded.last_hidden_state[:, 1:])  # [B, N, p*p*C]
        errors = (prediction - patchify(pixel_values, self.config.patch_size)).abs().mean(-1)  # [B, N]
        mask = torch.ones_like(errors) if bool_masked_pos is None else bool_masked_pos.reshape(errors.shape).float()
        output = MaskedImageModelingOutput(loss=(errors * mask).sum() / mask.sum().clamp(min=1),
                                           reconstruction=prediction, hidden_states=encoded.hidden_states,
                                           attentions=encoded.attentions)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class ToyMimForImageClassification(ImageClassificationMixin, ToyMimPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vit = ToyMimModel(config, use_final_norm=False)
        self.build_classification_head(config)
        self.post_init()
'''


@pytest.fixture
def throwaway_method(tmp_path, monkeypatch):
    """The package `hf_mim.models` in a temporary folder for the test: its files (linked) and the method's two
    new ones, `configuration_toymim.py` and `modeling_toymim.py`. Afterwards the package, and everything the
    method registered, are as before."""
    package = tmp_path / "toymim_package"
    package.mkdir()
    for source in Path(models.__file__).parent.glob("*.py"):  # saved checkpoints copy the siblings they import
        (package / source.name).symlink_to(source)
    (package / "configuration_toymim.py").write_text(textwrap.dedent(TOY_CONFIG))
    (package / "modeling_toymim.py").write_text(textwrap.dedent(TOY_MODEL))
    monkeypatch.setattr(models, "__path__", [str(package)])
    monkeypatch.setattr(masking, "MASK_GENERATORS", dict(masking.MASK_GENERATORS))
    # transformers' Auto registrations (`register_auto_classes` in the test), restored afterwards too
    autos = set(HEADS) | {auto for heads in model_families().values() for auto in heads}
    for mapping in (CONFIG_MAPPING, IMAGE_PROCESSOR_MAPPING, *(getattr(transformers, auto)._model_mapping
                                                               for auto in autos)):
        monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))
    presets.all_presets.cache_clear()
    yield package
    presets.all_presets.cache_clear()
    for name in ("modeling_toymim", "configuration_toymim"):
        sys.modules.pop(f"{models.__name__}.{name}", None)


def test_a_throwaway_method_in_a_temporary_package_keeps_the_contract(throwaway_method, tmp_path,
                                                                       single_torch_thread):
    model_lines = len((throwaway_method / "modeling_toymim.py").read_text().splitlines())
    assert model_lines < 100  # the shared encoder: a method's model file holds only what differs
    families = encoder_families()
    toy = next(config for config in families if config.model_type == "hf_mim_toymim")
    assert set(families[toy]) == set(HEADS)
    register_auto_classes()  # what `import hf_mim` does, now that the family exists
    assert type(presets.from_preset("toymim-demo")) is toy
    assert masking.mask_generator_class("toymim_random").__name__ == "ToyMaskGenerator"  # shipped with the model
    for param in heads_of({toy: families[toy]}):
        check_contract(*param.values, tmp_path)


# The training side of the throwaway method: one more file, a `TrainingMethod` registered for pretrain.py.
TOY_METHOD = '''
import dataclasses

import torch

from hf_mim.cli import option
from hf_mim.models.configuration_toymim import ToyMimConfig
from hf_mim.models.masking import build_mask_generator
from hf_mim.models.modeling_toymim import ToyMimForPreTraining
from hf_mim.pretraining import register_method
from hf_mim.training.method import CropOptions, TrainingMethod, crop_and_flip, processor_pixels


@dataclasses.dataclass
class ToyMimOptions(CropOptions):
    _argument_group_name = "ToyMIM options (--method toymim)"
    mask_ratio: float = option(0.5, help="fraction of masked patches")


@register_method
class ToyMimMethod(TrainingMethod):
    name, title, summary = "toymim", "ToyMIM", "ToyMIM: regress the pixels of masked patches."
    config_class, model_class, options_class = ToyMimConfig, ToyMimForPreTraining, ToyMimOptions
    mask_generator = "toymim_random"
    defaults = {"base_learning_rate": 1e-3, "weight_decay": 0.05}

    def mask_generator_kwargs(self):
        return {"mask_ratio": self.options.mask_ratio}

    def transform(self, pixels):
        masks = build_mask_generator(self.mask_generator, self.grid_size, **self.mask_generator_kwargs())

        def example(image, generator):
            return {"pixel_values": pixels(image), "bool_masked_pos": masks(generator)}
        return example

    def train_transform(self, processor):
        return self.transform(crop_and_flip(self.image_size, (self.options.crop_min_scale or 0.2, 1.0)))

    def eval_transform(self, processor):
        return self.transform(lambda image: processor_pixels(processor, image))

    def training_loss(self, model, batch):
        return model(**batch).loss

    def eval_sums(self, model, batch):  # the batch's mean loss for each of its images
        images = torch.ones(len(batch["pixel_values"]))
        return {"loss_sum": model(**batch).loss * images, "images": images}

    def eval_metrics(self, sums):
        return {"loss": sums["loss_sum"] / sums["images"]}
'''


def test_a_throwaway_method_trains_with_pretrain_py_and_loads_back(throwaway_method, tmp_path, monkeypatch, capfd,
                                                                    single_torch_thread):
    """The training side: a third file, registered from outside hf_mim's source tree, is a `--method` of
    pretrain.py that trains, evaluates, saves a model the Auto classes load, and gets a card."""
    from hf_mim import cards
    from hf_mim.pretraining import METHODS, main

    assert "toymim" not in cards.METHODS  # the card table, built before the method exists, ...

    register_auto_classes()
    (tmp_path / "toymim_training.py").write_text(textwrap.dedent(TOY_METHOD))
    monkeypatch.syspath_prepend(str(tmp_path))
    registered = dict(METHODS)
    try:
        import toymim_training  # noqa: F401 (registers the method)

        assert cards.METHODS["toymim"] == ("ToyMIM", "mim")  # ... counts it once it is registered
        assert len((tmp_path / "toymim_training.py").read_text().splitlines()) < 60
        out = tmp_path / "out"
        results = main(["--method", "toymim", "--config_name", "toymim-demo", "--mask_ratio", "0.4", "--max_steps", "3",
                        "--max_train_samples", "64", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
                        "--output_dir", str(out), "--report_to", "none", "--dataloader_num_workers", "0"])
    finally:
        METHODS.clear()
        METHODS.update(registered)
        sys.modules.pop("toymim_training", None)
    assert results["train_steps"] == 3 and torch.isfinite(torch.tensor(results["eval_loss"]))
    model = transformers.AutoModelForPreTraining.from_pretrained(out)
    assert type(model).__name__ == "ToyMimForPreTraining"
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.mask_generator == "toymim_random" and processor.mask_generator_kwargs == {"mask_ratio": 0.4}
    card = (out / "README.md").read_text()
    assert "ToyMIM: regress the pixels of masked patches." in card  # no template: the summary, and a warning
    warnings = [line for line in capfd.readouterr().err.splitlines() if "card_templates/methods/toymim.md" in line]
    assert len(warnings) == 1, warnings
