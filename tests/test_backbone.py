"""Backbones (AutoBackbone, UperNet's backbone_config) and pooled outputs of every hf_mim encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from transformers import AutoBackbone, AutoModel, UperNetConfig, UperNetForSemanticSegmentation, pipeline

from hf_mim import (
    BEiTBackbone, BEiTConfig, BEiTForImageClassification, BEiTForMaskedImageModeling, MaeBackbone, MaeConfig,
    MaeForImageClassification, MaeForPreTraining, MimImageProcessor, VitMppBackbone, VitMppConfig,
    VitMppForPreTraining,
)
from hf_mim.registry import model_families
from model_testing import randomize

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=4, drop_path_rate=0.0)
MAE_DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                   decoder_intermediate_size=32)
PER_BLOCK_TABLES = dict(use_relative_position_bias=True, use_shared_relative_position_bias=False)
NECK_KEYS = {
    "neck.fpn1.0.weight", "neck.fpn1.0.bias", "neck.fpn1.1.weight", "neck.fpn1.1.bias", "neck.fpn1.1.running_mean",
    "neck.fpn1.1.running_var", "neck.fpn1.1.num_batches_tracked", "neck.fpn1.3.weight", "neck.fpn1.3.bias",
    "neck.fpn2.weight", "neck.fpn2.bias",
}

FAMILIES = {  # name: (pre-training model, backbone class, config, backbone options)
    "mae": (lambda: MaeForPreTraining(MaeConfig(**TINY, **MAE_DECODER)), MaeBackbone, "encoder", {}),
    "beit": (lambda: BEiTForMaskedImageModeling(BEiTConfig(**TINY, vocab_size=10)), BEiTBackbone, "beit",
             PER_BLOCK_TABLES),
    "beitv2": (lambda: BEiTForMaskedImageModeling(BEiTConfig(
        **TINY, vocab_size=10, use_cls_pretext_head=True, cls_head_early_layer=2, cls_head_depth=1)),
        BEiTBackbone, "beit", PER_BLOCK_TABLES),
    "vit_mpp": (lambda: VitMppForPreTraining(VitMppConfig(**TINY)), VitMppBackbone, "vit", {}),
}


def test_every_registered_backbone_is_tested_here():
    """FAMILIES holds per-family loading options; a backbone added to the registry without them fails here."""
    registered = {heads["AutoBackbone"] for heads in model_families().values() if "AutoBackbone" in heads}
    assert registered == {backbone for _, backbone, *_ in FAMILIES.values()}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pretrained(request, tmp_path_factory):
    """(family name, saved pre-training checkpoint, the model that was saved)."""
    build, *_ = FAMILIES[request.param]
    model = randomize(build(), seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model


def test_feature_maps_are_the_chosen_stages_patch_tokens_in_grid_order(pretrained):
    name, folder, source = pretrained
    _, backbone_class, prefix, options = FAMILIES[name]
    backbone = backbone_class.from_pretrained(folder, out_indices=[0, 2, 4], **options).eval()
    pixels = torch.randn(2, 3, 32, 48)  # not the configured size: an 8x12 grid
    with torch.no_grad():
        maps = backbone(pixels).feature_maps
        # BEiT: the pre-training encoder adds its one shared table in every block, the backbone its copies
        states = getattr(source, prefix)(pixels, output_hidden_states=True).hidden_states
    assert backbone.out_features == ["stem", "stage2", "stage4"] and backbone.channels == [32, 32, 32]
    for feature_map, stage in zip(maps, (0, 2, 4)):
        assert feature_map.shape == (2, 32, 8, 12)
        # map[:, :, row, col] is patch row * cols + col, after the CLS token
        torch.testing.assert_close(feature_map[:, :, 3, 5], states[stage][:, 1 + 3 * 12 + 5], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), states[stage][:, 1:], rtol=1e-5, atol=1e-5)


def test_a_pretraining_checkpoint_loads_with_only_the_new_neck_missing(pretrained):
    name, folder, source = pretrained
    _, backbone_class, prefix, options = FAMILIES[name]
    backbone, info = backbone_class.from_pretrained(
        folder, out_indices=[1, 2, 3, 4], add_fpn=True, output_loading_info=True, **options
    )
    assert set(info["missing_keys"]) == NECK_KEYS
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = backbone.state_dict()
    for key, value in getattr(source, prefix).state_dict().items():
        if key.startswith("norm.") or key == "mask_token":
            continue  # the backbone reads block outputs (no final norm) and never masks
        if key.startswith("rel_pos_bias."):  # BEiT's shared table, copied into every block's own
            for block in range(4):
                torch.testing.assert_close(loaded[f"{prefix}.blocks.{block}.{key}"], value)
            continue
        torch.testing.assert_close(loaded[f"{prefix}.{key}"], value)


def test_a_finetuning_checkpoint_loads_with_nothing_unexpected(tmp_path):
    classifier = randomize(BEiTForImageClassification(BEiTConfig(**TINY, **PER_BLOCK_TABLES, num_labels=3)))
    classifier.save_pretrained(tmp_path)
    backbone, info = BEiTBackbone.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(backbone.beit.blocks[2].rel_pos_bias.relative_position_bias_table,
                               classifier.beit.blocks[2].rel_pos_bias.relative_position_bias_table)


def test_the_neck_gives_beits_pyramid_and_upernet_trains_on_it(pretrained):
    name, folder, _ = pretrained
    _, backbone_class, _, options = FAMILIES[name]
    backbone = backbone_class.from_pretrained(folder, out_indices=[1, 2, 3, 4], add_fpn=True, **options)
    maps = backbone(torch.randn(2, 3, 32, 32)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    config = UperNetConfig(backbone_config=backbone.config, num_labels=5, hidden_size=16, auxiliary_channels=8)
    segmenter = UperNetForSemanticSegmentation(config)
    assert type(segmenter.backbone) is backbone_class
    segmenter.backbone.load_state_dict(backbone.state_dict())
    output = segmenter(torch.randn(2, 3, 32, 32), labels=torch.randint(0, 5, (2, 32, 32)))
    assert output.logits.shape == (2, 5, 32, 32)
    output.loss.backward()
    assert segmenter.backbone.base_model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_upernet_with_an_hf_mim_backbone_saves_and_reloads(tmp_path):
    backbone_config = MaeConfig(**TINY, **MAE_DECODER, out_indices=[1, 2, 3, 4], add_fpn=True)
    segmenter = UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone_config, num_labels=3, hidden_size=16, auxiliary_channels=8)
    ).eval()
    segmenter.save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, segmenter(pixels).logits)


def test_auto_backbone_builds_each_family_from_its_config():
    for config, backbone_class in ((MaeConfig(**TINY), MaeBackbone), (BEiTConfig(**TINY), BEiTBackbone),
                                   (VitMppConfig(**TINY), VitMppBackbone)):
        assert type(AutoBackbone.from_config(config)) is backbone_class


def test_backbones_return_attention_maps_and_tuples_on_request():
    backbone = MaeBackbone(MaeConfig(**TINY)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    assert backbone.has_attentions  # else BackboneMixin.forward_with_filtered_kwargs drops output_attentions
    plain = backbone(pixels, output_attentions=False)  # what UperNet and DPT pass
    assert plain.feature_maps and plain.attentions is None
    with torch.no_grad():
        maps = backbone(pixels, output_attentions=True)
        as_tuple = backbone(pixels, return_dict=False)
    assert len(maps.attentions) == TINY["num_hidden_layers"]
    assert maps.attentions[0].shape == (1, TINY["num_attention_heads"], 65, 65)
    torch.testing.assert_close(maps.attentions[0].sum(-1), torch.ones(1, TINY["num_attention_heads"], 65))
    assert type(as_tuple) is tuple  # the maps run the eager kernel, the tuple call sdpa: equal to rounding
    torch.testing.assert_close(as_tuple[0][0], maps.feature_maps[0], rtol=1e-5, atol=1e-5)


def test_out_indices_beyond_the_depth_name_the_valid_range():
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\].*num_hidden_layers=4"):
        MaeConfig(**TINY, out_indices=[2, 5])
    config = MaeConfig(**TINY)
    with pytest.raises(ValueError, match=r"beyond the depth"):
        config.out_indices = [7]


def test_the_neck_needs_four_stages_and_two_patches_per_side():
    with pytest.raises(StrictDataclassError, match=r"needs 4 out_indices.*out_indices=\[1, 2, 3, 4\]"):
        MaeConfig(**TINY, out_indices=[2, 4], add_fpn=True)
    backbone = MaeBackbone(MaeConfig(**TINY, out_indices=[1, 2, 3, 4], add_fpn=True))
    with pytest.raises(ValueError, match="at least 2 patches per side"):
        backbone(torch.randn(1, 3, 4, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        backbone(torch.randn(1, 3, 30, 32))


# ---------------------------------------------------------------------------------------------
# pooler_output: the fine-tuning recipe's pooling
# ---------------------------------------------------------------------------------------------


def test_pooler_output_is_the_classifiers_pooling(tmp_path):
    classifier = randomize(MaeForImageClassification(MaeConfig(**TINY, num_labels=3)))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        encoded = classifier.encoder(pixels)
        torch.testing.assert_close(encoded.pooler_output, encoded.last_hidden_state[:, 1:].mean(dim=1))
        logits = classifier.head(classifier.fc_norm(encoded.pooler_output))
        torch.testing.assert_close(classifier(pixels).logits, logits)
    cls_pooled = randomize(BEiTForImageClassification(BEiTConfig(**TINY, use_mean_pooling=False)))
    with torch.no_grad():
        encoded = cls_pooled.beit(pixels)
    torch.testing.assert_close(encoded.pooler_output, encoded.last_hidden_state[:, 0])


def test_feature_extraction_pipeline_pools(tmp_path):
    model = randomize(MaeForPreTraining(MaeConfig(**TINY, **MAE_DECODER)))
    model.save_pretrained(tmp_path)
    MimImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    pooled = torch.tensor(extractor(image, pool=True))
    assert pooled.shape == (1, 32)
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    inputs = extractor.image_processor(image, return_tensors="pt")
    with torch.no_grad():
        expected = encoder(**inputs).last_hidden_state[:, 1:].mean(dim=1)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def test_dpt_reads_the_stage_tokens_for_depth_estimation():
    from transformers import DPTConfig, DPTForDepthEstimation

    backbone_config = VitMppConfig(**TINY, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DPTConfig(backbone_config=backbone_config, neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16,
                       reassemble_factors=[4, 2, 1, 0.5], hidden_size=32, head_in_index=-1)
    model = DPTForDepthEstimation(config)
    assert type(model.backbone) is VitMppBackbone
    depth = model(torch.randn(2, 3, 32, 32)).predicted_depth
    assert depth.shape == (2, 8 * 16, 8 * 16)  # DPT's fusion and head upsample the 8x8 grid x16 (made for p=16)
    depth.mean().backward()
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(StrictDataclassError, match="add_fpn needs feature maps"):
        MaeConfig(**TINY, out_indices=[1, 2, 3, 4], add_fpn=True, reshape_hidden_states=False)


# Runs in a fresh interpreter with `import hf_mim` made impossible. transformers 5.24's
# AutoBackbone.from_pretrained asks the Hub whether a local folder is a repo (and fails), so the
# class is resolved from the checkpoint's auto_map as AutoBackbone would for a Hub id.
LOAD_BACKBONE_WITHOUT_HF_MIM = """
import sys
sys.modules["hf_mim"] = None
import torch
from transformers import AutoConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module
checkpoint, pixels_path, out_path = sys.argv[1:]
config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
backbone_class = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], checkpoint)
backbone = backbone_class.from_pretrained(checkpoint).eval()
with torch.no_grad():
    maps = backbone(torch.load(pixels_path)).feature_maps
loaded = any(name.startswith("hf_mim.") for name in sys.modules)
torch.save({"maps": maps, "class": backbone_class.__module__, "hf_mim": loaded}, out_path)
"""


def test_a_saved_backbone_loads_where_hf_mim_is_not_installed(tmp_path):
    import os
    import subprocess
    import sys

    backbone = randomize(BEiTBackbone(BEiTConfig(**TINY, **PER_BLOCK_TABLES, out_indices=[1, 2, 3, 4], add_fpn=True)))
    backbone.save_pretrained(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "modeling_backbone.py").is_file()
    pixels = torch.randn(1, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    (tmp_path / "load.py").write_text(LOAD_BACKBONE_WITHOUT_HF_MIM)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "checkpoint"),
                             str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["class"].startswith("transformers_modules.") and not remote["hf_mim"]
    with torch.no_grad():
        for theirs, ours in zip(remote["maps"], backbone(pixels).feature_maps):
            torch.testing.assert_close(theirs, ours)


def test_a_config_rebuilt_with_another_depth_derives_its_stages_anew():
    """`--config_overrides num_hidden_layers=4` on a preset rebuilds the config from its saved fields: the
    default output stage (the last) must follow the new depth; an explicit choice is kept."""

    def rebuilt(config, **changes):
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
        return type(config)(**{**fields, **changes})

    shallow = rebuilt(MaeConfig(), num_hidden_layers=4)
    assert list(shallow.out_indices) == [4] and shallow.stage_names[-1] == "stage4"
    chosen = MaeConfig(num_hidden_layers=8, out_indices=[2, 4, 6, 8])
    assert list(rebuilt(chosen).out_indices) == [2, 4, 6, 8]
