"""The beit / beitv2 converters on reference-format checkpoints (the transformers path is in test_beit.py)."""

from __future__ import annotations

import re

import pytest
import torch

from hf_mim import BEiTConfig, BEiTForImageClassification, BEiTForMaskedImageModeling, BEiTModel
from hf_mim.convert.__main__ import main as convert_main
from hf_mim.models.relative_position import relative_position_index
from model_testing import randomize

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, vocab_size=50, drop_path_rate=0.1, layer_norm_eps=1e-6)


def reference_state_dict(model: torch.nn.Module) -> dict:
    """The model's weights under the microsoft/unilm names, with the index buffers the reference stores."""
    grid = (4, 4)
    state = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("beit.")
        key = re.sub(r"^((?:blocks|cls_pt_layers)\.\d+\.)rel_pos_bias\.", r"\1attn.", key)
        state[key] = value.clone()
        if key.endswith("relative_position_bias_table"):
            index_key = key.replace("relative_position_bias_table", "relative_position_index")
            state[index_key] = relative_position_index(grid)
    return state


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert sorted(first) == sorted(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def inputs():
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    mask = torch.rand(2, 16, generator=generator) < 0.5
    return pixels, mask, torch.randint(0, 50, (2, 16), generator=generator)


def test_reference_beit_v1_pretraining_round_trip(tmp_path):
    original = randomize(BEiTForMaskedImageModeling(BEiTConfig(**TINY)))
    torch.save({"model": reference_state_dict(original)}, tmp_path / "beit.pth")
    assert convert_main(["beit", str(tmp_path / "beit.pth"), str(tmp_path / "out")]) == 0
    converted = BEiTForMaskedImageModeling.from_pretrained(tmp_path / "out").eval()
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                  "image_size", "patch_size", "layer_norm_eps", "layer_scale_init_value", "drop_path_rate",
                  "use_shared_relative_position_bias", "use_relative_position_bias",
                  "use_absolute_position_embeddings"):
        assert getattr(converted.config, field) == getattr(original.config, field), field
    assert_same_weights(original, converted)
    pixels, mask, labels = inputs()
    with torch.no_grad():
        assert torch.equal(original(pixels, mask, labels).logits, converted(pixels, mask, labels).logits)


@pytest.mark.parametrize("shared_lm_head", [True, False])  # False: beit2's cls_pt_norm / cls_pt_lm_head
def test_reference_beit_v2_with_cls_head(tmp_path, shared_lm_head):
    config = BEiTConfig(**TINY, use_cls_pretext_head=True, cls_head_early_layer=2, cls_head_depth=2,
                        shared_lm_head=shared_lm_head)
    original = randomize(BEiTForMaskedImageModeling(config))
    torch.save({"module": reference_state_dict(original)}, tmp_path / "beitv2.pth")
    # The plain BEiT converter points at the v2 one.
    with pytest.raises(ValueError, match="beitv2"):
        convert_main_raising(["beit", str(tmp_path / "beitv2.pth"), str(tmp_path / "wrong")])
    assert convert_main(["beitv2", str(tmp_path / "beitv2.pth"), str(tmp_path / "out"),
                         "--config", "cls_head_early_layer=2"]) == 0
    converted = BEiTForMaskedImageModeling.from_pretrained(tmp_path / "out").eval()
    assert converted.config.use_cls_pretext_head and converted.config.cls_head_depth == 2
    assert converted.config.shared_lm_head is shared_lm_head  # told by the weights (cls_pt_lm_head)
    assert_same_weights(original, converted)
    pixels, mask, labels = inputs()
    with torch.no_grad():
        expected, got = original(pixels, mask, labels), converted(pixels, mask, labels)
    assert torch.equal(expected.cls_head_logits, got.cls_head_logits) and torch.equal(expected.loss, got.loss)


def test_default_early_layer_is_depth_minus_three(tmp_path):
    config = BEiTConfig(**{**TINY, "num_hidden_layers": 4}, use_cls_pretext_head=True, cls_head_early_layer=1)
    torch.save({"model": reference_state_dict(BEiTForMaskedImageModeling(config))}, tmp_path / "v2.pth")
    with pytest.warns(UserWarning, match="depth - 3 = 1"):
        assert convert_main(["beitv2", str(tmp_path / "v2.pth"), str(tmp_path / "out")]) == 0
    assert BEiTConfig.from_pretrained(tmp_path / "out").cls_head_early_layer == 1


def test_reference_fine_tuned_classifier_with_per_block_tables(tmp_path):
    config = BEiTConfig(**TINY, use_shared_relative_position_bias=False, use_relative_position_bias=True, num_labels=6)
    original = randomize(BEiTForImageClassification(config))
    state = reference_state_dict(original)
    assert "blocks.1.attn.relative_position_bias_table" in state and "fc_norm.weight" in state
    torch.save({"model": state}, tmp_path / "ft.pth")
    assert convert_main(["beit", str(tmp_path / "ft.pth"), str(tmp_path / "out")]) == 0
    converted = BEiTForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert converted.config.use_relative_position_bias and converted.config.num_labels == 6
    assert_same_weights(original, converted)
    pixels, _, _ = inputs()
    with torch.no_grad():
        assert torch.equal(original(pixels).logits, converted(pixels).logits)


def test_encoder_only_file_becomes_beit_model(tmp_path):
    original = randomize(BEiTModel(BEiTConfig(**TINY)))
    torch.save({"model": reference_state_dict(original)}, tmp_path / "enc.pth")
    assert convert_main(["beit", str(tmp_path / "enc.pth"), str(tmp_path / "out")]) == 0
    assert_same_weights(original, BEiTModel.from_pretrained(tmp_path / "out"))


def convert_main_raising(argv):
    """Run a converter the way main() does, but let its error through for pytest.raises."""
    from hf_mim.convert.__main__ import build_parser

    args = build_parser().parse_args(argv)
    return args.convert(args)


def test_clear_errors(tmp_path):
    state = reference_state_dict(BEiTForMaskedImageModeling(BEiTConfig(**TINY)))
    mae_like = {k: v for k, v in state.items() if "q_bias" not in k and "v_bias" not in k}
    mae_like["blocks.0.attn.qkv.bias"] = torch.zeros(96)
    torch.save({"model": mae_like}, tmp_path / "mae.pth")
    with pytest.raises(ValueError, match="use the mae converter"):
        convert_main_raising(["beit", str(tmp_path / "mae.pth"), str(tmp_path / "a")])
    torch.save({"model": state}, tmp_path / "beit.pth")
    with pytest.raises(ValueError, match="vocab_size=10 but the weights have vocab_size=50"):
        convert_main_raising(["beit", str(tmp_path / "beit.pth"), str(tmp_path / "b"), "--config", "vocab_size=10"])
    with pytest.raises(ValueError, match="not BEiTConfig fields"):
        convert_main_raising(["beit", str(tmp_path / "beit.pth"), str(tmp_path / "c"), "--config", "mask_ratio=0.4"])
    extra = dict(state, **{"blocks.0.attn.unknown": torch.zeros(1)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="not part of a BEiT model"):
        convert_main_raising(["beit", str(tmp_path / "extra.pth"), str(tmp_path / "d")])


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_transformers_classifier_with_per_block_tables(tmp_path, mean_pooling):
    from transformers import BeitConfig as TransformersBeitConfig
    from transformers import BeitForImageClassification as TransformersClassifier

    config = TransformersBeitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        layer_norm_eps=1e-6, use_relative_position_bias=True, use_mean_pooling=mean_pooling, num_labels=4,
        drop_path_rate=0.0,
    )
    reference = randomize(TransformersClassifier(config))
    reference.save_pretrained(tmp_path / "transformers")
    assert convert_main(["beit", str(tmp_path / "transformers"), str(tmp_path / "out")]) == 0
    converted = BEiTForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert converted.config.use_relative_position_bias and converted.config.use_mean_pooling == mean_pooling
    assert converted.config.id2label == reference.config.id2label
    pixels, _, _ = inputs()
    with torch.no_grad():
        assert torch.allclose(converted(pixels).logits, reference(pixels).logits, atol=1e-4)
