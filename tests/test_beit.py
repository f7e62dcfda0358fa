"""BEiT / BEiT v2 models: parity with transformers, masked-token loss, v2 CLS head, init, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from hf_mim import BEiTConfig, BEiTForImageClassification, BEiTForMaskedImageModeling, BEiTModel
from hf_mim.convert.__main__ import main as convert_main
from hf_mim.models.relative_position import relative_position_index, resize_relative_position_bias_table
from model_testing import randomize

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, vocab_size=50, drop_path_rate=0.0)
GRID = 16  # 4x4 patches


def tiny_config(**changes) -> BEiTConfig:
    return BEiTConfig(**{**TINY, **changes})


def batch(seed: int = 0, size: int = 3, image: int = 32, ratio: float = 0.4):
    generator = torch.Generator().manual_seed(seed)
    grid = (image // 8) ** 2
    pixels = torch.randn(size, 3, image, image, generator=generator)
    mask = torch.rand(size, grid, generator=generator) < ratio
    mask[0, :2] = True  # at least one masked patch
    labels = torch.randint(0, TINY["vocab_size"], (size, grid), generator=generator)
    return pixels, mask, labels


# ---------------------------------------------------------------------------------------------
# Parity with transformers' BeitForMaskedImageModeling (converted with the beit converter)
# ---------------------------------------------------------------------------------------------


def test_parity_with_transformers_masked_image_modeling(tmp_path):
    from transformers import BeitConfig as TransformersBeitConfig
    from transformers import BeitForMaskedImageModeling as TransformersBeit

    reference_config = TransformersBeitConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        vocab_size=50, layer_norm_eps=1e-6, use_shared_relative_position_bias=True, use_mask_token=True,
        use_mean_pooling=True, drop_path_rate=0.0,
    )
    reference = randomize(TransformersBeit(reference_config))
    reference.save_pretrained(tmp_path / "transformers")
    assert convert_main(["beit", str(tmp_path / "transformers"), str(tmp_path / "hf_mim")]) == 0
    model = BEiTForMaskedImageModeling.from_pretrained(tmp_path / "hf_mim").eval()
    assert model.config.use_shared_relative_position_bias and not model.config.use_relative_position_bias

    pixels, mask, labels = batch()
    with torch.no_grad():
        expected = reference(pixels, bool_masked_pos=mask, labels=labels[mask])  # transformers: masked labels only
        ours = model(pixels, mask, labels)
    assert ours.logits.shape == (int(mask.sum()), 50)
    assert torch.allclose(ours.logits, expected.logits[mask], atol=1e-4)
    assert torch.allclose(ours.loss, expected.loss, atol=1e-4)
    # The attention maps (with the relative position bias in them), block by block.
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        expected_maps = reference(pixels, bool_masked_pos=mask, output_attentions=True).attentions
        maps = model(pixels, mask, output_attentions=True).attentions
    assert len(maps) == len(expected_maps) == 3 and maps[0].shape == (3, 4, 17, 17)
    for ours_map, theirs in zip(maps, expected_maps):
        torch.testing.assert_close(ours_map, theirs, atol=1e-5, rtol=0)
    # The comparison is not blind to the position bias: without it the logits move.
    with torch.no_grad():
        model.beit.rel_pos_bias.relative_position_bias_table.zero_()
        assert not torch.allclose(model(pixels, mask).logits, expected.logits[mask], atol=1e-2)


def test_eager_and_sdpa_agree_with_the_bias():
    model = randomize(BEiTForMaskedImageModeling(tiny_config()))
    pixels, mask, labels = batch()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(pixels, mask, labels)
        model.set_attn_implementation("eager")
        eager = model(pixels, mask, labels)
    assert torch.allclose(sdpa.logits, eager.logits, atol=1e-5)
    assert torch.allclose(sdpa.loss, eager.loss, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The masked-token loss
# ---------------------------------------------------------------------------------------------


def test_loss_and_accuracy_over_masked_tokens_only():
    model = randomize(BEiTForMaskedImageModeling(tiny_config()))
    pixels, mask, labels = batch()
    out = model(pixels, mask, labels)
    targets = labels[mask]  # row-major: sample by sample, patch order inside
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, targets), atol=1e-6)
    assert out.accuracy == pytest.approx((out.logits.argmax(-1) == targets).float().mean().item())
    assert out.mim_loss is out.loss and out.cls_head_loss is None
    # Unmasked labels do not matter; the rows of `logits` follow the mask.
    other = labels.clone()
    other[~mask] = (other[~mask] + 1) % 50
    assert torch.equal(model(pixels, mask, other).loss, out.loss)
    with torch.no_grad():
        tokens = model.beit(pixels, bool_masked_pos=mask).last_hidden_state[:, 1:]
    assert torch.allclose(out.logits, model.lm_head(tokens[mask]), atol=1e-6)


def test_masked_patches_see_the_mask_token_not_their_pixels():
    model = randomize(BEiTForMaskedImageModeling(tiny_config()))
    pixels, mask, _ = batch()
    changed = pixels.clone()
    changed[0, :, :8, :8] += 5.0  # patch 0 of sample 0, masked
    with torch.no_grad():
        first = model.beit(pixels, bool_masked_pos=mask).last_hidden_state
        second = model.beit(changed, bool_masked_pos=mask).last_hidden_state
    assert torch.equal(first, second)


def test_no_masked_patch_gives_zero_loss_not_nan():
    model = BEiTForMaskedImageModeling(tiny_config(use_cls_pretext_head=True, cls_head_early_layer=2))
    model.train()
    pixels, _, labels = batch()
    out = model(pixels, torch.zeros(3, GRID, dtype=torch.bool), labels)
    assert out.logits.shape == (0, 50) and out.cls_head_logits.shape == (0, 50)
    assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    assert out.accuracy.item() == 0.0
    assert out.loss.requires_grad
    out.loss.backward()  # the graph is intact
    assert model.lm_head.weight.grad is not None and torch.count_nonzero(model.lm_head.weight.grad) == 0


def test_masks_differ_per_sample_and_accept_grid_shape():
    model = randomize(BEiTForMaskedImageModeling(tiny_config()))
    pixels, _, labels = batch()
    mask = torch.zeros(3, GRID, dtype=torch.bool)
    mask[0, :5], mask[1, 3:4], mask[2, :] = True, True, True  # 5, 1 and 16 masked
    flat = model(pixels, mask, labels)
    grid = model(pixels, mask.reshape(3, 4, 4).int(), labels.reshape(3, 4, 4))
    assert flat.logits.shape == (22, 50)
    assert torch.equal(flat.logits, grid.logits) and torch.equal(flat.loss, grid.loss)


@pytest.mark.parametrize(
    "mask_shape, labels_shape, vocab_labels, message",
    [
        ((3, 15), (3, 16), False, r"bool_masked_pos has shape \[3, 15\], expected \[3, 16\]"),
        ((2, 16), (3, 16), False, r"bool_masked_pos has shape \[2, 16\]"),
        ((3, 16), (3, 15), False, r"labels has shape \[3, 15\], expected the visual-token ids of every patch"),
        ((3, 16), (16,), False, r"transformers' BeitForMaskedImageModeling takes only the masked"),
        ((3, 16), (3, 2, 8), False, r"labels has shape \[3, 2, 8\]"),
        ((3, 16), (3, 16), True, r"vocab_size=50.*tokenizer's codebook size"),
    ],
)
def test_clear_errors_for_bad_inputs(mask_shape, labels_shape, vocab_labels, message):
    model = BEiTForMaskedImageModeling(tiny_config())
    pixels = torch.randn(3, 3, 32, 32)
    mask = torch.zeros(mask_shape, dtype=torch.bool)
    labels = torch.full(labels_shape, 50 if vocab_labels else 0)
    with pytest.raises(ValueError, match=message):
        model(pixels, mask, labels)


def test_mask_values_and_missing_mask_errors():
    model = BEiTForMaskedImageModeling(tiny_config())
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="needs `bool_masked_pos`"):
        model(pixels)
    with pytest.raises(ValueError, match="boolean"):
        model(pixels, torch.full((1, GRID), 2))
    with pytest.raises(ValueError, match="integer visual-token ids"):
        model(pixels, torch.zeros(1, GRID, dtype=torch.bool), torch.zeros(1, GRID))


def test_config_errors_name_the_fix():
    with pytest.raises(StrictDataclassError, match="choose one"):
        tiny_config(use_relative_position_bias=True)
    with pytest.raises(StrictDataclassError, match="cls_head_early_layer=4 must name a block between 1 and"):
        tiny_config(use_cls_pretext_head=True, cls_head_early_layer=4)
    with pytest.raises(StrictDataclassError, match="not divisible by num_attention_heads"):
        tiny_config(num_attention_heads=5)
    with pytest.raises(StrictDataclassError, match="not divisible by the patch size"):
        tiny_config(image_size=30)


# ---------------------------------------------------------------------------------------------
# BEiT v2 CLS head
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_head", [False, True], ids=["v1", "v2"])
def test_compiles_with_one_graph_break_for_the_masked_count(cls_head):
    """The number of masked patches varies per batch: read once after the encoder, it is the only
    graph break, so the encoder, the LM head and the loss compile whole; the result equals eager."""
    config = tiny_config(use_cls_pretext_head=cls_head, cls_head_early_layer=1, cls_head_depth=1)
    model = randomize(BEiTForMaskedImageModeling(config))
    pixels, mask, labels = batch()
    explanation = torch._dynamo.explain(model)(pixels, mask, labels)
    assert explanation.graph_break_count == 1, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")(pixels, mask, labels)
    eager = model(pixels, mask, labels)
    torch.testing.assert_close(compiled.logits, eager.logits)
    torch.testing.assert_close(compiled.loss, eager.loss)


def test_v2_cls_head_shapes_names_and_loss_sum():
    config = tiny_config(use_cls_pretext_head=True, cls_head_early_layer=2, cls_head_depth=2)
    model = randomize(BEiTForMaskedImageModeling(config))
    assert "cls_pt_layers.1.attn.qkv.weight" in model.state_dict()
    assert "cls_pt_layers.0.gamma_1" in model.state_dict()
    pixels, mask, labels = batch()
    out = model(pixels, mask, labels)
    masked = int(mask.sum())
    assert out.logits.shape == out.cls_head_logits.shape == (masked, 50)
    assert torch.allclose(out.loss, out.mim_loss + out.cls_head_loss)
    targets = labels[mask]
    assert torch.allclose(out.cls_head_loss, torch.nn.functional.cross_entropy(out.cls_head_logits, targets), atol=1e-6)
    assert out.cls_head_accuracy is not None

    # The head's input: patch tokens after block 2 (of 3) and the last block's CLS before the norm.
    with torch.no_grad():
        states = model.beit(pixels, bool_masked_pos=mask, output_hidden_states=True).hidden_states
        x = torch.cat([states[3][:, :1], states[2][:, 1:]], dim=1)
        bias = model.beit.rel_pos_bias().unsqueeze(0)
        for block in model.cls_pt_layers:
            x = block(x, bias)
        expected = model.lm_head(model.beit.norm(x[:, 1:][mask]))
    assert torch.allclose(out.cls_head_logits, expected, atol=1e-5)

    out.loss.backward()
    assert model.cls_pt_layers[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.beit.blocks[2].mlp.fc2.weight.grad.abs().sum() > 0  # the main loss reaches the last block


# ---------------------------------------------------------------------------------------------
# Init
# ---------------------------------------------------------------------------------------------

ONE_SIGMA_STD = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))  # 0.5396


def test_reference_init_statistics():
    config = tiny_config(hidden_size=96, intermediate_size=384, num_attention_heads=4, num_hidden_layers=3,
                         use_cls_pretext_head=True, cls_head_early_layer=2, cls_head_depth=2, vocab_size=256)
    model = BEiTForMaskedImageModeling(config)
    std = 0.02
    for name in ("beit.patch_embed.proj.weight", "beit.blocks.0.attn.qkv.weight", "beit.blocks.1.mlp.fc1.weight",
                 "lm_head.weight"):
        weight = model.get_parameter(name)
        assert weight.abs().max() <= std + 1e-7, name  # cut at one sigma
        assert weight.std().item() == pytest.approx(std * ONE_SIGMA_STD, rel=0.06), name
    for token in (model.beit.cls_token, model.beit.mask_token):
        assert token.abs().max() <= std and token.abs().max() > 0
    for layer_id, block in enumerate(model.beit.blocks, start=1):
        scale = math.sqrt(2 * layer_id)
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert weight.abs().max() <= std / scale + 1e-7
            assert weight.std().item() == pytest.approx(std * ONE_SIGMA_STD / scale, rel=0.06)
        assert torch.count_nonzero(block.attn.q_bias) == 0 and torch.count_nonzero(block.attn.proj.bias) == 0
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.gamma_2 == 0.1)
    assert torch.count_nonzero(model.beit.rel_pos_bias.relative_position_bias_table) == 0
    assert torch.count_nonzero(model.lm_head.bias) == 0


def assert_torch_default_linear(weight: torch.Tensor, scale: float = 1.0, name: str = ""):
    """nn.Linear.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (std bound/sqrt(3)), weights / `scale`."""
    bound = weight.shape[1] ** -0.5 / scale
    assert bound * 0.95 < weight.abs().max() <= bound + 1e-7, name
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.06), name


def test_v2_cls_head_keeps_the_torch_default_init_then_the_rescale():
    """beit2 builds cls_pt_layers after its init pass: PyTorch's default Linear init (weights and biases),
    q/v biases zero, layer scales at their value, then proj/fc2 divided by sqrt(2 * (early + j + 1))."""
    config = tiny_config(hidden_size=96, intermediate_size=384, num_attention_heads=4, num_hidden_layers=3,
                         use_cls_pretext_head=True, cls_head_early_layer=2, cls_head_depth=2, vocab_size=256)
    model = BEiTForMaskedImageModeling(config)
    for j, block in enumerate(model.cls_pt_layers):
        scale = math.sqrt(2 * (config.cls_head_early_layer + j + 1))
        assert_torch_default_linear(block.attn.qkv.weight, name="qkv")
        assert_torch_default_linear(block.mlp.fc1.weight, name="fc1")
        assert_torch_default_linear(block.attn.proj.weight, scale, "proj")
        assert_torch_default_linear(block.mlp.fc2.weight, scale, "fc2")
        for bias in (block.attn.proj.bias, block.mlp.fc1.bias, block.mlp.fc2.bias):  # not rescaled
            fan_in = 384 if bias is block.mlp.fc2.bias else 96
            assert 0.9 * fan_in**-0.5 < bias.abs().max() <= fan_in**-0.5
        assert torch.count_nonzero(block.attn.q_bias) == 0 and torch.count_nonzero(block.attn.v_bias) == 0
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.norm1.weight == 1)


@pytest.mark.parametrize("early, head, expected", [
    (2, 1, [0.0, 0.05, 0.1, 0.1]),  # within the depth: the encoder's own ramp (block 2's rate)
    (2, 2, [0.0, 0.05, 0.1, 0.2 / 3, 0.1]),  # past it: linspace(0, 0.1, max(3, 2 + 2)) for the head
])
def test_v2_cls_head_drop_path_rates_follow_beit2(early, head, expected):
    """beit2: the encoder's blocks take linspace(0, rate, depth); the head's block j takes element
    early + j of linspace(0, rate, max(depth, early + head))."""
    config = tiny_config(num_hidden_layers=3, drop_path_rate=0.1, use_cls_pretext_head=True,
                         cls_head_early_layer=early, cls_head_depth=head)
    model = BEiTForMaskedImageModeling(config)
    encoder = [block.drop_path.rate for block in model.beit.blocks]
    heads = [block.drop_path.rate for block in model.cls_pt_layers]
    ramp = torch.linspace(0, 0.1, max(3, early + head)).tolist()
    assert encoder == pytest.approx(torch.linspace(0, 0.1, 3).tolist())
    assert heads == pytest.approx(ramp[early:early + head])
    assert encoder + heads == pytest.approx(expected)


def test_v2_cls_head_with_its_own_norm_and_lm_head():
    """beit2's shared_lm_head=False: the head's tokens go through cls_pt_norm and cls_pt_lm_head."""
    config = tiny_config(use_cls_pretext_head=True, cls_head_early_layer=2, cls_head_depth=1, shared_lm_head=False)
    model = randomize(BEiTForMaskedImageModeling(config))
    assert {"cls_pt_norm.weight", "cls_pt_lm_head.weight", "cls_pt_lm_head.bias"} <= set(model.state_dict())
    pixels, mask, labels = batch()
    out = model(pixels, mask, labels)
    with torch.no_grad():
        states = model.beit(pixels, bool_masked_pos=mask, output_hidden_states=True).hidden_states
        x = model.cls_pt_layers[0](torch.cat([states[3][:, :1], states[2][:, 1:]], dim=1),
                                   model.beit.rel_pos_bias().unsqueeze(0))
        expected = model.cls_pt_lm_head(model.cls_pt_norm(x[:, 1:][mask]))
    torch.testing.assert_close(out.cls_head_logits, expected)
    out.loss.backward()
    assert model.cls_pt_lm_head.weight.grad.abs().sum() > 0 and model.cls_pt_norm.weight.grad.abs().sum() > 0
    # Its init is the reference's for a fresh LM head: truncated normal std 0.02 cut at one sigma.
    fresh = BEiTForMaskedImageModeling(config)
    assert fresh.cls_pt_lm_head.weight.abs().max() <= 0.02 and torch.count_nonzero(fresh.cls_pt_lm_head.bias) == 0


def test_loading_does_not_rescale_and_fills_missing_weights_freshly(tmp_path):
    config = tiny_config(hidden_size=96, intermediate_size=96, num_attention_heads=4)
    model = randomize(BEiTForMaskedImageModeling(config))
    model.save_pretrained(tmp_path)
    loaded = BEiTForMaskedImageModeling.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name  # a loaded proj/fc2 weight is not divided again
    # A weight missing from the checkpoint gets the fresh init, rescaled once for its depth.
    weights = load_file(tmp_path / "model.safetensors")
    del weights["beit.blocks.2.attn.proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    partial = BEiTForMaskedImageModeling.from_pretrained(tmp_path)
    fresh = partial.beit.blocks[2].attn.proj.weight
    assert fresh.abs().max() <= 0.02 / math.sqrt(6) + 1e-7
    assert fresh.std().item() == pytest.approx(0.02 * ONE_SIGMA_STD / math.sqrt(6), rel=0.1)
    assert torch.equal(partial.beit.blocks[1].attn.proj.weight, model.beit.blocks[1].attn.proj.weight)


# ---------------------------------------------------------------------------------------------
# Save / load, Auto classes, shared -> per-block
# ---------------------------------------------------------------------------------------------


LAYOUTS = [
    dict(),
    dict(use_shared_relative_position_bias=False, use_relative_position_bias=True),
    dict(use_absolute_position_embeddings=True, use_shared_relative_position_bias=False),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_round_trip(tmp_path, layout):
    model = randomize(BEiTForMaskedImageModeling(tiny_config(**layout)))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(loaded) is BEiTForMaskedImageModeling
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    pixels, mask, labels = batch()
    with torch.no_grad():
        assert torch.equal(model(pixels, mask, labels).logits, loaded(pixels, mask, labels).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), BEiTModel)


def test_shared_table_is_copied_into_every_block(tmp_path):
    pretrained = randomize(BEiTForMaskedImageModeling(tiny_config()))
    pretrained.save_pretrained(tmp_path)
    shared = pretrained.beit.rel_pos_bias.relative_position_bias_table
    classifier, info = AutoModelForImageClassification.from_pretrained(
        tmp_path, use_shared_relative_position_bias=False, use_relative_position_bias=True, num_labels=5,
        output_loading_info=True,
    )
    assert type(classifier) is BEiTForImageClassification
    assert classifier.beit.rel_pos_bias is None
    for block in classifier.beit.blocks:
        assert torch.equal(block.rel_pos_bias.relative_position_bias_table, shared)
    assert not any("rel_pos_bias" in key for key in info["missing_keys"] | info["unexpected_keys"])
    # Same features as the pre-trained encoder (the classifier has no mask token and no final norm).
    per_block = BEiTModel.from_pretrained(tmp_path, use_shared_relative_position_bias=False,
                                          use_relative_position_bias=True).eval()
    pixels, _, _ = batch()
    with torch.no_grad():
        expected = pretrained.beit(pixels).last_hidden_state
        assert torch.allclose(per_block(pixels).last_hidden_state, expected, atol=1e-6)
        pooled = classifier.fc_norm(classifier.beit(pixels).last_hidden_state[:, 1:].mean(1))
        assert torch.allclose(classifier(pixels).logits, classifier.head(pooled))


def test_shared_table_of_an_encoder_checkpoint_is_copied_too(tmp_path):
    encoder = randomize(BEiTModel(tiny_config()))
    encoder.save_pretrained(tmp_path)  # keys without the `beit.` prefix
    classifier = BEiTForImageClassification.from_pretrained(
        tmp_path, use_shared_relative_position_bias=False, use_relative_position_bias=True, num_labels=2)
    shared = encoder.rel_pos_bias.relative_position_bias_table
    for block in classifier.beit.blocks:
        assert torch.equal(block.rel_pos_bias.relative_position_bias_table, shared)


def test_per_block_checkpoint_into_shared_model_is_an_error(tmp_path):
    model = BEiTModel(tiny_config(use_shared_relative_position_bias=False, use_relative_position_bias=True))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_shared_relative_position_bias=False, use_relative_position_bias=True"):
        BEiTModel.from_pretrained(tmp_path, use_shared_relative_position_bias=True, use_relative_position_bias=False)


def test_classification_heads_and_other_grids():
    for pooling in (True, False):
        model = randomize(BEiTForImageClassification(tiny_config(num_labels=7, use_mean_pooling=pooling)))
        assert (model.fc_norm is not None) == pooling and (model.beit.norm is None) == pooling
        out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 6]))
        assert out.logits.shape == (2, 7) and torch.isfinite(out.loss)
    # A 6x6 grid on a model built for 4x4: the relative table is resized on the fly, as for a model
    # built for 6x6 holding the resized table.
    model = randomize(BEiTModel(tiny_config()))
    bigger = BEiTModel(tiny_config(image_size=48)).eval()
    state = model.state_dict()
    table = state["rel_pos_bias.relative_position_bias_table"]
    state["rel_pos_bias.relative_position_bias_table"] = resize_relative_position_bias_table(table, (4, 4), (6, 6))
    bigger.load_state_dict(state)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(pixels).last_hidden_state, bigger(pixels).last_hidden_state, atol=1e-5)
    assert torch.equal(bigger.rel_pos_bias.relative_position_index, relative_position_index((6, 6)))


# ---------------------------------------------------------------------------------------------
# Remote code: the saved directory works where hf_mim is not installed
# ---------------------------------------------------------------------------------------------

REMOTE_SCRIPT = """
import sys
sys.modules["hf_mim"] = None  # the package must not be importable
import torch
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

path, io = sys.argv[1], torch.load(sys.argv[2])
try:
    AutoModel.from_pretrained(path)
    raise SystemExit("loaded custom code without trust_remote_code")
except ValueError as error:
    assert "trust_remote_code" in str(error)
model = AutoModelForPreTraining.from_pretrained(path, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(model).__name__ == "BEiTForMaskedImageModeling"
with torch.no_grad():
    out = model(io["pixels"], io["mask"], io["labels"])
assert torch.allclose(out.logits, io["logits"], atol=1e-6) and torch.allclose(out.loss, io["loss"], atol=1e-6)
classifier = AutoModelForImageClassification.from_pretrained(
    path, trust_remote_code=True, use_shared_relative_position_bias=False, use_relative_position_bias=True,
    num_labels=3,
)
shared = model.beit.rel_pos_bias.relative_position_bias_table
assert all(torch.equal(b.rel_pos_bias.relative_position_bias_table, shared) for b in classifier.beit.blocks)
print("REMOTE-OK")
"""


def test_remote_code_load_without_hf_mim(tmp_path):
    import os
    import subprocess
    import sys

    model = randomize(BEiTForMaskedImageModeling(tiny_config()))
    model.save_pretrained(tmp_path / "checkpoint")
    pixels, mask, labels = batch()
    with torch.no_grad():
        out = model(pixels, mask, labels)
    torch.save({"pixels": pixels, "mask": mask, "labels": labels, "logits": out.logits, "loss": out.loss},
               tmp_path / "io.pt")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "io.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK" in result.stdout


@pytest.mark.parametrize("cls_head", [False, True])
def test_per_sample_losses_tuples_and_unknown_keywords(cls_head):
    changes = {"use_cls_pretext_head": True, "cls_head_early_layer": 1} if cls_head else {}
    model = randomize(BEiTForMaskedImageModeling(tiny_config(**changes))).eval()
    pixels, labels = torch.randn(3, 3, 32, 32), torch.randint(0, model.config.vocab_size, (3, 16))
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :5], mask[1, 3:4], mask[2, 8:16] = True, True, True  # 5, 1 and 8 masked patches
    with torch.no_grad():
        out = model(pixels, bool_masked_pos=mask, labels=labels)
        as_tuple = model(pixels, bool_masked_pos=mask, labels=labels, return_dict=False)
    samples = mask.nonzero()[:, 0]
    ce = torch.nn.functional.cross_entropy(out.logits, labels[mask], reduction="none")  # [M]
    per_image = torch.zeros(3).index_add(0, samples, ce) / mask.sum(-1)
    if cls_head:
        head = torch.nn.functional.cross_entropy(out.cls_head_logits, labels[mask], reduction="none")
        per_image_head = torch.zeros(3).index_add(0, samples, head) / mask.sum(-1)
        torch.testing.assert_close(out.cls_head_per_sample_loss, per_image_head)
        per_image = per_image + per_image_head
    torch.testing.assert_close(out.per_sample_loss, per_image)
    correct = (out.logits.argmax(-1) == labels[mask]).float()
    torch.testing.assert_close(out.per_sample_accuracy, torch.zeros(3).index_add(0, samples, correct) / mask.sum(-1))
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    with pytest.raises(TypeError, match="unexpected keyword argument 'noise'"):
        model(pixels, bool_masked_pos=mask, noise=torch.rand(3, 16))
