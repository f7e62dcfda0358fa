"""`python -m hf_mim.export`: timm folders and transformers' own classes compute what the hf_mim model computes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining, BeitForMaskedImageModeling

import hf_mim
from hf_mim import (
    BEiTConfig, BEiTForImageClassification, MaeConfig, MaeForImageClassification,
    MaeForPreTraining, VitMppConfig, VitMppForImageClassification, VitMppForPreTraining,
)
from hf_mim.export.__main__ import main as export_main
from model_testing import randomize

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, drop_path_rate=0.0)
MAE_DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                   decoder_intermediate_size=32)
PER_BLOCK = dict(use_relative_position_bias=True, use_shared_relative_position_bias=False)
MODELS = {
    "mae-pretraining": lambda: MaeForPreTraining(MaeConfig(**TINY, **MAE_DECODER)),
    "mae-classifier": lambda: MaeForImageClassification(MaeConfig(**TINY, num_labels=5)),
    "mae-cls-classifier": lambda: MaeForImageClassification(MaeConfig(**TINY, num_labels=5, use_mean_pooling=False)),
    "beit-pretraining": lambda: hf_mim.BEiTForMaskedImageModeling(BEiTConfig(**TINY, vocab_size=10)),
    "beitv2-pretraining": lambda: hf_mim.BEiTForMaskedImageModeling(BEiTConfig(
        **TINY, vocab_size=10, use_cls_pretext_head=True, cls_head_early_layer=2, cls_head_depth=1)),
    "beit-classifier": lambda: BEiTForImageClassification(BEiTConfig(**TINY, **PER_BLOCK, num_labels=4)),
    "beit-cls-abs-classifier": lambda: BEiTForImageClassification(BEiTConfig(
        **TINY, num_labels=4, use_mean_pooling=False, use_absolute_position_embeddings=True,
        use_shared_relative_position_bias=False, layer_scale_init_value=0.0)),
    "mae-cls-pretraining": lambda: MaeForPreTraining(MaeConfig(**TINY, **MAE_DECODER, use_mean_pooling=False)),
    "beit-cls-pretraining": lambda: hf_mim.BEiTForMaskedImageModeling(BEiTConfig(**TINY, vocab_size=10,
                                                                                  use_mean_pooling=False)),
    "vit_mpp-pretraining": lambda: VitMppForPreTraining(VitMppConfig(**TINY)),
    "vit_mpp-cls-classifier": lambda: VitMppForImageClassification(VitMppConfig(**TINY, num_labels=3,
                                                                                use_mean_pooling=False)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder of the saved hf_mim model, the model)."""
    folders = {}
    for index, (name, build) in enumerate(MODELS.items()):
        model = randomize(build(), seed=index)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        folders[name] = (folder, model)
    return folders


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_timm_export_computes_the_same_features_pooling_and_logits(name, saved, tmp_path):
    timm = pytest.importorskip("timm")
    folder, model = saved[name]
    assert export_main(["timm", str(folder), str(tmp_path)]) == 0
    timm_config = json.loads((tmp_path / "config.json").read_text())
    assert timm_config["architecture"] in ("vit_base_patch16_224", "beit_base_patch16_224")
    exported = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        encoded = model.base_model(PIXELS)
        features = exported.forward_features(PIXELS)
        torch.testing.assert_close(features, encoded.last_hidden_state, rtol=1e-5, atol=1e-5)
        if hasattr(model, "head"):
            torch.testing.assert_close(exported(PIXELS), model(PIXELS).logits, rtol=1e-5, atol=1e-5)
        else:  # timm's pooled features are the encoder's pooler_output
            pooled = exported.forward_head(features, pre_logits=True)
            torch.testing.assert_close(pooled, encoded.pooler_output, rtol=1e-5, atol=1e-5)


def test_timm_export_says_what_it_leaves_out(saved, tmp_path, caplog):
    pytest.importorskip("timm")
    folder, _ = saved["mae-pretraining"]
    with caplog.at_level("WARNING"):
        assert export_main(["timm", str(folder), str(tmp_path)]) == 0
    assert "timm has no place for 20 parameters" in caplog.text and "decoder_blocks.0" in caplog.text


# ---------------------------------------------------------------------------------------------
# transformers' own classes
# ---------------------------------------------------------------------------------------------


def test_mae_pretraining_becomes_vitmae_with_the_same_loss(saved, tmp_path):
    folder, model = saved["mae-pretraining"]
    assert export_main(["transformers", str(folder), str(tmp_path)]) == 0
    exported = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(exported).__name__ == "ViTMAEForPreTraining"
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(PIXELS, noise=noise), exported(PIXELS, noise=noise)
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.loss, ours.loss, rtol=1e-5, atol=1e-5)


def test_beit_pretraining_becomes_beit_masked_image_modeling(saved, tmp_path):
    folder, model = saved["beit-pretraining"]
    assert export_main(["transformers", str(folder), str(tmp_path)]) == 0
    exported = BeitForMaskedImageModeling.from_pretrained(tmp_path).eval()  # transformers' own class
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) < 0.4
    mask[0, 0] = True
    with torch.no_grad():
        ours, theirs = model(PIXELS, bool_masked_pos=mask), exported(PIXELS, bool_masked_pos=mask)
    torch.testing.assert_close(theirs.logits[mask], ours.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,expected", [("beit-classifier", "BeitForImageClassification"),
                                           ("beit-cls-abs-classifier", "BeitForImageClassification"),
                                           ("mae-cls-classifier", "ViTForImageClassification"),
                                           ("vit_mpp-cls-classifier", "ViTForImageClassification")])
def test_classifiers_become_transformers_classifiers_with_the_same_logits(name, expected, saved, tmp_path):
    folder, model = saved[name]
    assert export_main(["transformers", str(folder), str(tmp_path)]) == 0
    exported = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(exported).__name__ == expected
    assert exported.config.id2label == model.config.id2label
    with torch.no_grad():
        torch.testing.assert_close(exported(PIXELS).logits, model(PIXELS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,fix", [("beitv2-pretraining", "BeitModel"), ("vit_mpp-pretraining", "ViTModel")])
def test_heads_transformers_lacks_are_an_error_and_the_encoder_exports(name, fix, saved, tmp_path, capsys):
    folder, model = saved[name]
    assert export_main(["transformers", str(folder), str(tmp_path / "full")]) == 2
    assert f"--encoder_only: {fix}" in capsys.readouterr().err
    assert export_main(["transformers", str(folder), str(tmp_path / "encoder"), "--encoder_only"]) == 0
    exported = AutoModel.from_pretrained(tmp_path / "encoder").eval()
    assert type(exported).__name__ == fix
    with torch.no_grad():
        torch.testing.assert_close(exported(PIXELS).last_hidden_state, model.base_model(PIXELS).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


ENCODER_EXPORTS = {"mae-pretraining": "ViTModel", "mae-cls-pretraining": "ViTModel", "beit-pretraining": "BeitModel",
                   "beit-cls-pretraining": "BeitModel", "beitv2-pretraining": "BeitModel",
                   "vit_mpp-pretraining": "ViTModel"}


@pytest.mark.parametrize("name", sorted(ENCODER_EXPORTS))
def test_encoder_only_exports_compute_hf_mims_automodel_output_deterministically(name, saved, tmp_path, caplog):
    """Every token in order (an MAE encoder is never masked), pooler_output equal where hf_mim pools the CLS
    token; with hf_mim's default patch-mean pooling the export says how to get it, and that line is right."""
    folder, _ = saved[name]
    with caplog.at_level("WARNING"):
        assert export_main(["transformers", str(folder), str(tmp_path), "--encoder_only"]) == 0
    exported = AutoModel.from_pretrained(tmp_path).eval()
    ours = AutoModel.from_pretrained(folder).eval()  # what a user of the hf_mim checkpoint gets
    assert type(exported).__name__ == ENCODER_EXPORTS[name]
    with torch.no_grad():
        expected, first, second = ours(PIXELS), exported(PIXELS), exported(PIXELS)
    assert first.last_hidden_state.shape == expected.last_hidden_state.shape == (2, 17, 32)
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(first.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    if ours.config.use_mean_pooling:
        assert "last_hidden_state[:, 1:].mean(1)" in caplog.text
        pooled = first.last_hidden_state[:, 1:].mean(1)
    else:
        assert "pooler_output" not in caplog.text
        pooled = first.pooler_output
    torch.testing.assert_close(pooled, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_a_mean_pooling_vit_classifier_points_to_timm(saved, tmp_path, capsys):
    folder, _ = saved["mae-classifier"]
    assert export_main(["transformers", str(folder), str(tmp_path)]) == 2
    assert "python -m hf_mim.export timm" in capsys.readouterr().err


def test_a_tokenizer_is_not_exportable(tmp_path, capsys):
    from hf_mim import VqkdConfig

    VqkdConfig().save_pretrained(tmp_path / "vqkd")  # the type is checked before any weight is read
    assert export_main(["timm", str(tmp_path / "vqkd"), str(tmp_path / "out")]) == 2
    assert "exports exist for the encoders" in capsys.readouterr().err
