"""transformers' own ModelTesterMixin and BackboneTesterMixin (from the source distribution of the installed
transformers, see tests/transformers_common.py) over every hf_mim encoder family and every head it has.

One test case per (family, head): the heads of a family see different sequences (MAE pre-training drops
the masked patches), and transformers' testers describe one. The families and heads come from
`registry.model_families()`, so a new method is tested without an edit here. What is not run is listed,
with its reason, in `transformers_common.DELIBERATE_DIFFERENCES`.
"""

from __future__ import annotations

import re
import subprocess
import unittest

import pytest
import torch

from transformers_common import (
    DELIBERATE_DIFFERENCES, HEADS, FamilyModelTester, common_test_modules, deliberately_skipped, deterministic_config,
    encoder_families, fetch_common_tests, head_inputs,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

try:
    fetch_common_tests()
except (subprocess.SubprocessError, OSError) as error:  # no registry: say so, do not pretend to have run them
    pytest.skip(f"transformers' common tests could not be fetched from the package registry: {error}",
                allow_module_level=True)
modeling_common, backbone_common = common_test_modules()  # anything else wrong here is an error, not a skip


class HfMimModelTests(modeling_common.ModelTesterMixin):
    """The adapter: transformers' mixin with hf_mim's inputs per head; deliberate differences skipped."""

    test_resize_embeddings = False  # (has_attentions: the mixin's default, True)

    def setUp(self):
        self.model_tester = FamilyModelTester(self, self.config_class, self.all_model_classes[0], self.config_overrides)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if "noise" in inputs:  # MAE chooses the dropped patches from one of them (both: a clear error)
            inputs.pop("bool_masked_pos", None)
        inputs.update(head_inputs(model_class, self.model_tester, inputs, return_labels))
        return inputs

    def test_model_get_set_embeddings(self):
        """As transformers' own ViT / BEiT tests: the input embedding of an image model is its patch
        projection, not an nn.Embedding."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIs(model.get_input_embeddings(), model.base_model.patch_embed)  # not just any module
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, torch.nn.Linear))


class HfMimBackboneTests(backbone_common.BackboneTesterMixin):
    def setUp(self):
        self.model_tester = FamilyModelTester(self, self.config_class, self.all_model_classes[0])


def skip_deliberate_differences(cls: type) -> type:
    for name in dir(cls):
        reason = deliberately_skipped(name) if name.startswith("test_") else None
        if reason:
            setattr(cls, name, unittest.skip(f"deliberate difference: {reason}")(getattr(cls, name)))
    return cls


def test_every_listed_difference_names_a_common_test():
    """No stale entry: each names (or matches) a test of transformers' mixins."""
    names = [name for mixin in (modeling_common.ModelTesterMixin, backbone_common.BackboneTesterMixin)
             for name in dir(mixin) if name.startswith("test_")]
    for pattern in DELIBERATE_DIFFERENCES:
        assert any(re.fullmatch(pattern, name) for name in names), pattern


def make_test_cases() -> dict[str, type]:
    cases = {}
    for config_class, heads in encoder_families().items():
        family = config_class.model_type.removeprefix("hf_mim_").title().replace("_", "")
        for auto_name in HEADS:
            if auto_name in heads:
                model_class = heads[auto_name]
                attributes = {"all_model_classes": (model_class,), "config_class": config_class,
                              "config_overrides": deterministic_config(config_class)}
                name = f"Test{family}{model_class.__name__}Common"
                cases[name] = skip_deliberate_differences(
                    type(name, (HfMimModelTests, unittest.TestCase), attributes))
        if "AutoBackbone" in heads:
            attributes = {"all_model_classes": (heads["AutoBackbone"],), "config_class": config_class}
            name = f"Test{family}BackboneCommon"
            cases[name] = skip_deliberate_differences(type(name, (HfMimBackboneTests, unittest.TestCase), attributes))
    return cases


globals().update(make_test_cases())
