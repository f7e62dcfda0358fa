"""hf_mim's MAE models (tiny configs, CPU): the fixed sin-cos tables, masking, patches, the loss,
the init, save/load, and the transformers features (hidden states, checkpointing, attention kernels)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from mae_testing import perturb_parameters_, reference_sincos_table, tiny_mae_config
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForPreTraining, ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

from hf_mim import MaeConfig, MaeForImageClassification, MaeForPreTraining, MaeModel
from hf_mim.models.vit_core import patchify, sincos_2d_table, unpatchify


def tiny_pretraining_model(seed: int = 0, **overrides) -> MaeForPreTraining:
    torch.manual_seed(seed)
    return perturb_parameters_(MaeForPreTraining(tiny_mae_config(**overrides)), seed).eval()


# ---------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos tables
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, dim", [((3, 5), 16), ((14, 14), 64), ((4, 6), 32)])
def test_sincos_table_matches_formula(grid, dim):
    table = sincos_2d_table(grid, dim)
    assert table.dtype == torch.float32 and table.shape == (1 + grid[0] * grid[1], dim)
    # Computed in float64, then rounded once: bit-equal to the float64 formula cast to float32.
    expected = torch.from_numpy(reference_sincos_table(*grid, dim)).float()
    assert torch.equal(table, expected)
    assert torch.equal(table[0], torch.zeros(dim))  # the CLS row
    # Spot-check the layout by hand: patch (row 2, col 1), first channel of each quarter.
    row, col, quarter = 2, 1, dim // 4
    patch = table[1 + row * grid[1] + col]
    assert patch[0].item() == pytest.approx(math.sin(col)) and patch[quarter].item() == pytest.approx(math.cos(col))
    assert patch[2 * quarter].item() == pytest.approx(math.sin(row))
    assert patch[3 * quarter].item() == pytest.approx(math.cos(row))
    assert sincos_2d_table(grid, dim, cls_token=False).shape == (grid[0] * grid[1], dim)


def test_float32_computation_would_differ():
    """What the float64 test above guards against: the same formula in float32 changes values."""
    quarter = 16
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    angles = torch.arange(14, dtype=torch.float32)[:, None] * omega
    float32_sin = torch.sin(angles)
    float64_sin = torch.from_numpy(np.sin(np.arange(14)[:, None] * 10000.0 ** (-np.arange(quarter) / quarter))).float()
    assert not torch.equal(float32_sin, float64_sin)


@pytest.mark.parametrize("rows, cols", [(4, 4), (3, 5)])
def test_sincos_table_matches_transformers_with_half_swap(rows, cols):
    dim = 32
    theirs = build_2d_sinusoidal_position_embedding(rows, cols, embed_dim=dim, cls_token=True)  # [h | w]
    swapped = torch.cat([theirs[:, dim // 2:], theirs[:, :dim // 2]], dim=1)  # the checkpoints' [w | h]
    torch.testing.assert_close(sincos_2d_table((rows, cols), dim), swapped, atol=1e-7, rtol=0)
    assert not torch.allclose(sincos_2d_table((rows, cols), dim), theirs)  # the swap matters


def assert_tables_correct(model: MaeForPreTraining, dtype: torch.dtype = torch.float32):
    """The tables the model adds to its tokens, as seen by an input of `dtype`."""
    grid = model.encoder.grid_size
    like = torch.zeros(1, dtype=dtype)
    assert torch.equal(model.encoder.position_table(grid, like), sincos_2d_table(grid, 32).to(dtype)[None])
    assert torch.equal(model.decoder.pos_embed.to(dtype), sincos_2d_table(grid, 16).to(dtype)[None])


def test_tables_after_construction_and_loading(tmp_path):
    model = tiny_pretraining_model()
    assert_tables_correct(model)
    model.save_pretrained(tmp_path)
    assert not any("pos_embed" in key for key in load_file(tmp_path / "model.safetensors"))  # never stored
    assert_tables_correct(MaeForPreTraining.from_pretrained(tmp_path))
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.encoder.cls_token.dtype == torch.bfloat16
    assert_tables_correct(loaded, torch.bfloat16)
    model_without_decoder = MaeModel.from_pretrained(tmp_path)  # drops the decoder, keeps the table
    assert torch.equal(model_without_decoder.pos_embed[0], sincos_2d_table((4, 4), 32))


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6, 0.0])
def test_masking_invariants(ratio):
    model = tiny_pretraining_model(mask_ratio=ratio)
    pixels, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        out = model(pixels, noise=noise)
    kept = int(16 * (1 - ratio))
    assert torch.equal(out.mask.sum(dim=1), torch.full((3,), 16.0 - kept))
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, out.ids_restore), torch.arange(16).expand(3, 16))  # inverse
    expected_mask = torch.ones(3, 16)
    expected_mask.scatter_(1, ids_shuffle[:, :kept], 0.0)  # the `kept` smallest noises stay visible
    assert torch.equal(out.mask, expected_mask)
    assert out.logits.shape == (3, 16, 8 * 8 * 3)


def test_encoder_keeps_the_right_tokens():
    """With no blocks, each encoder output token depends on its own patch only: the masked output
    must be the unmasked output gathered at the kept patches, in the shuffled order."""
    torch.manual_seed(0)
    model = perturb_parameters_(MaeModel(tiny_mae_config(num_hidden_layers=0))).eval()
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        full = model(pixels).last_hidden_state  # [B, 1+16, D]
        masked = model(pixels, noise=noise).last_hidden_state  # [B, 1+4, D]
    ids_keep = torch.argsort(noise, dim=1)[:, :4]
    assert torch.equal(masked[:, 0], full[:, 0])
    assert torch.equal(masked[:, 1:], torch.gather(full[:, 1:], 1, ids_keep[..., None].expand(-1, -1, 32)))


def test_same_noise_same_output_and_ratio_override():
    model = tiny_pretraining_model()
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        first, second = model(pixels, noise=noise), model(pixels, noise=noise)
        other = model(pixels, noise=torch.rand(2, 16))
        half = model(pixels, noise=noise, mask_ratio=0.5)
        encoded = model.encoder(pixels, noise=noise, mask_ratio=0.5)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.loss, second.loss)
    assert not torch.equal(first.mask, other.mask)
    assert torch.equal(half.mask.sum(dim=1), torch.full((2,), 8.0))  # the argument beats config.mask_ratio 0.75
    assert encoded.last_hidden_state.shape == (2, 1 + 8, 32)
    torch.manual_seed(3)
    drawn = model(pixels).mask
    torch.manual_seed(3)
    assert torch.equal(model(pixels).mask, drawn)  # without noise: torch's RNG decides


def test_invalid_mask_ratio_errors():
    model = tiny_pretraining_model()
    pixels = torch.randn(1, 3, 32, 32)
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            model(pixels, mask_ratio=ratio)
        with pytest.raises((ValueError, StrictDataclassError), match="mask_ratio must be in"):
            tiny_mae_config(mask_ratio=ratio)
    with pytest.raises(ValueError, match="keeps no patch"):
        model(pixels, mask_ratio=0.99)  # int(16 * 0.01) = 0 patches


# ---------------------------------------------------------------------------------------------
# The encoder as a feature extractor
# ---------------------------------------------------------------------------------------------


def test_feature_extractor_is_deterministic_and_unmasked():
    torch.manual_seed(0)
    model = perturb_parameters_(MaeModel(tiny_mae_config(drop_path_rate=0.1, hidden_dropout_prob=0.1))).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixels)
        again = model(pixels).last_hidden_state
        # By hand: patch tokens + table, CLS + its (zero) row, every block, final norm.
        table = torch.from_numpy(reference_sincos_table(4, 4, 32)).float()
        tokens = model.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + table[1:]
        x = torch.cat([(model.cls_token + table[:1]).expand(2, -1, -1), tokens], dim=1)
        for block in model.blocks:
            x = block(x)
        manual = model.norm(x)
        # mask_ratio 0 with increasing noise keeps every patch in its own order: the same computation.
        identity = model(pixels, noise=torch.arange(16.0).expand(2, 16), mask_ratio=0.0).last_hidden_state
    assert out.mask is None and out.ids_restore is None
    assert out.last_hidden_state.shape == (2, 17, 32)
    assert torch.equal(out.last_hidden_state, again)
    torch.testing.assert_close(out.last_hidden_state, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(identity, out.last_hidden_state, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Patches and image sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("size, patch", [((32, 32), 8), ((32, 48), 8), ((32, 48), (4, 8)), ((24, 16), (8, 4))])
def test_patchify_round_trip_and_order(channels, size, patch):
    pixels = torch.randn(2, channels, *size)
    patches = patchify(pixels, patch)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    rows, cols = size[0] // ph, size[1] // pw
    assert patches.shape == (2, rows * cols, ph * pw * channels)
    assert torch.equal(unpatchify(patches, patch, (rows, cols), channels), pixels)
    # Each patch vector ordered (row in patch, column in patch, channel); patches row-major.
    for r, c, i, j, ch in [(0, 0, 0, 0, 0), (rows - 1, 1, ph - 1, pw - 1, channels - 1), (1, cols - 1, 2, 1, 0)]:
        value = patches[1, r * cols + c, (i * pw + j) * channels + ch]
        assert value == pixels[1, ch, r * ph + i, c * pw + j]


def test_patchify_matches_transformers():
    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                          image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=32)
    theirs, ours = ViTMAEForPreTraining(config), MaeForPreTraining(tiny_mae_config())
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours.patchify(pixels), theirs.patchify(pixels))
    assert torch.equal(ours.unpatchify(ours.patchify(pixels)), pixels)


def test_non_square_images():
    model = tiny_pretraining_model(image_size=[32, 48])
    assert model.encoder.grid_size == (4, 6)
    pixels, noise = torch.randn(2, 3, 32, 48), torch.rand(2, 24)
    with torch.no_grad():
        out = model(pixels, noise=noise)
        tall = model(torch.randn(1, 3, 48, 32), noise=torch.rand(1, 24))  # another grid: fresh tables
        embedded, _ = model.encoder.embed(torch.zeros(1, 3, 48, 32))  # [1, 1+L, D], CLS first
    tokens = embedded[:, 1:]
    assert out.logits.shape == (2, 24, 192) and out.mask.sum() == 2 * 18
    assert tall.logits.shape == (1, 24, 192) and torch.isfinite(tall.loss)
    patch_bias_only = model.encoder.patch_embed.proj.bias
    assert torch.allclose(tokens[0], patch_bias_only + sincos_2d_table((6, 4), 32)[1:], atol=1e-6)
    assert torch.equal(model.unpatchify(model.patchify(pixels)), pixels)


def test_clear_errors_for_bad_images():
    model = tiny_pretraining_model()
    with pytest.raises(ValueError, match=r"Expected pixel_values of shape \[batch, 3, height, width\].*3 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="30x32 is not divisible by the patch size 8x8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises((ValueError, StrictDataclassError), match="not divisible by the patch size"):
        tiny_mae_config(image_size=30)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_against_direct_formula(norm_pix_loss):
    model = tiny_pretraining_model(norm_pix_loss=norm_pix_loss)
    pixels, noise = torch.randn(2, 3, 32, 32) * 2 + 0.5, torch.rand(2, 16)
    with torch.no_grad():
        out = model(pixels, noise=noise)
    target = model.patchify(pixels).double()  # [B, L, 192]
    if norm_pix_loss:
        count = target.shape[-1]
        mean = target.sum(dim=-1, keepdim=True) / count
        unbiased_var = ((target - mean) ** 2).sum(dim=-1, keepdim=True) / (count - 1)
        target = (target - mean) / torch.sqrt(unbiased_var + 1e-6)
    per_patch = ((out.logits.double() - target) ** 2).mean(dim=-1)
    expected = (per_patch * out.mask).sum() / out.mask.sum()
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-5, rtol=1e-6)


def test_loss_is_finite_on_flat_images_and_in_bfloat16():
    model = tiny_pretraining_model(norm_pix_loss=True)
    flat = torch.full((2, 3, 32, 32), 0.3)  # zero variance per patch: eps keeps the target finite
    with torch.no_grad():
        assert torch.isfinite(model(flat).loss)
        half = copy.deepcopy(model).to(torch.bfloat16)
        assert torch.isfinite(half(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).loss)


# ---------------------------------------------------------------------------------------------
# Init
# ---------------------------------------------------------------------------------------------


def init_config() -> MaeConfig:
    # Wide enough for statistics: 256 token entries, >= 16k weights per Linear.
    return MaeConfig(hidden_size=256, num_hidden_layers=1, num_attention_heads=4, intermediate_size=512,
                     decoder_hidden_size=256, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                     decoder_intermediate_size=512, image_size=32, patch_size=8)


def assert_xavier_uniform(weight: torch.Tensor, fan_in: int, fan_out: int):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert weight.abs().max() <= bound and weight.abs().max() > 0.98 * bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def assert_conv2d_default_bias(bias: torch.Tensor, fan_in: int):
    """The reference re-initialises only the patch projection's weight, so its bias is what
    nn.Conv2d.reset_parameters draws: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (std bound/sqrt(3))."""
    bound = 1 / math.sqrt(fan_in)
    assert bias.abs().max() <= bound and bias.abs().max() > 0.9 * bound
    assert bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def assert_reference_init(model: MaeForPreTraining):
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert_xavier_uniform(module.weight, module.in_features, module.out_features)
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    # The patch projection as a 2-D [D, C*p*p] matrix: fan_in C*p*p, fan_out D (a Conv2d's own
    # fans would give a 8x smaller bound, its default init 1/sqrt(fan_in)).
    proj = model.encoder.patch_embed.proj
    assert_xavier_uniform(proj.weight, 3 * 8 * 8, 256)
    assert_conv2d_default_bias(proj.bias, fan_in=3 * 8 * 8)
    for token in (model.encoder.cls_token, model.decoder.mask_token):
        assert token.mean().abs() < 0.01 and 0.016 < token.std() < 0.024


def test_reference_init():
    torch.manual_seed(0)
    assert_reference_init(MaeForPreTraining(init_config()))


def test_init_of_weights_missing_from_a_checkpoint(tmp_path):
    """A decoder trained on top of an encoder-only checkpoint starts from the reference init."""
    torch.manual_seed(0)
    encoder = perturb_parameters_(MaeModel(init_config()))
    encoder.save_pretrained(tmp_path)
    model = MaeForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(model.encoder.cls_token, encoder.cls_token)  # loaded, not re-initialised
    assert torch.equal(model.encoder.patch_embed.proj.weight, encoder.patch_embed.proj.weight)
    decoder = model.decoder
    for linear in (decoder.embed, decoder.pred, decoder.blocks[0].attn.qkv, decoder.blocks[0].mlp.fc1):
        assert_xavier_uniform(linear.weight, linear.in_features, linear.out_features)
    assert 0.016 < decoder.mask_token.std() < 0.024
    assert torch.equal(decoder.pos_embed[0], sincos_2d_table((4, 4), 256))


# ---------------------------------------------------------------------------------------------
# Save / load, transformers features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    model = tiny_pretraining_model().to(dtype)
    model.save_pretrained(tmp_path)
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {dtype}
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path, dtype=dtype).eval()
    assert type(loaded) is MaeForPreTraining
    pixels, noise = torch.randn(2, 3, 32, 32, dtype=dtype), torch.rand(2, 16)
    with torch.no_grad():
        expected, out = model(pixels, noise=noise), loaded(pixels, noise=noise)
    assert out.logits.dtype == dtype
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)


def test_output_hidden_states():
    model = tiny_pretraining_model()
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        encoded = model.encoder(pixels, output_hidden_states=True)
        pretraining = model(pixels, noise=noise, output_hidden_states=True)
        assert model(pixels, noise=noise).hidden_states is None
    assert len(encoded.hidden_states) == 1 + 2 and all(h.shape == (2, 17, 32) for h in encoded.hidden_states)
    assert torch.equal(encoded.last_hidden_state, model.encoder.norm(encoded.hidden_states[-1]))
    assert len(pretraining.hidden_states) == 3 and pretraining.hidden_states[0].shape == (2, 1 + 4, 32)
    classifier = MaeForImageClassification(tiny_mae_config(num_labels=5))
    out = classifier(pixels, labels=torch.tensor([1, 4]), output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.logits.shape == (2, 5) and torch.isfinite(out.loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_pretraining_model().train()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in [*checkpointed.encoder.blocks, *checkpointed.decoder.blocks])
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for each in (model, checkpointed):
        each(pixels, noise=noise).loss.backward()
    for (name, plain), (_, ckpt) in zip(model.named_parameters(), checkpointed.named_parameters()):
        assert ckpt.grad is not None, name
        torch.testing.assert_close(ckpt.grad, plain.grad, atol=1e-6, rtol=1e-5)


def test_eager_and_sdpa_attention_agree(tmp_path):
    tiny_pretraining_model().save_pretrained(tmp_path)
    outputs = {}
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for implementation in ("eager", "sdpa"):
        model = MaeForPreTraining.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        blocks = [*model.encoder.blocks, *model.decoder.blocks]
        assert all(block.attn.config._attn_implementation == implementation for block in blocks)
        with torch.no_grad():
            outputs[implementation] = model(pixels, noise=noise).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("eager")  # switches every block of the loaded sdpa model at once
    assert all(block.attn.config._attn_implementation == "eager" for block in [*model.encoder.blocks,
                                                                                *model.decoder.blocks])
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, noise=noise).logits, outputs["eager"], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# One mask input: bool_masked_pos from the image processor
# ---------------------------------------------------------------------------------------------


def test_given_mask_keeps_the_visible_patches_in_order():
    """With no blocks each encoder token depends on its own patch: the output must be the unmasked
    output at exactly the patches the mask leaves visible, in their original order."""
    torch.manual_seed(0)
    model = perturb_parameters_(MaeModel(tiny_mae_config(num_hidden_layers=0))).eval()
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15]] = True  # image 0 keeps 1, 2, 4, 14
    mask[1, 4:] = True  # image 1 keeps 0-3
    with torch.no_grad():
        full = model(pixels).last_hidden_state  # [B, 1+16, D]
        masked = model(pixels, bool_masked_pos=mask)
    kept = torch.tensor([[1, 2, 4, 14], [0, 1, 2, 3]])
    assert torch.equal(masked.last_hidden_state[:, 1:], torch.gather(full[:, 1:], 1, kept[..., None].expand(-1, -1, 32)))
    assert torch.equal(masked.mask, mask.float())


def test_pretraining_uses_the_processors_mask():
    from hf_mim import MimImageProcessor

    model = tiny_pretraining_model()
    processor = MimImageProcessor(size={"height": 32, "width": 32}, patch_size=8, mask_generator="random",
                                  mask_generator_kwargs={"mask_ratio": 0.5})
    images = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(2)]
    inputs = processor(images, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    assert torch.equal(out.mask, inputs["bool_masked_pos"].float())  # not the config's 75% of its own
    assert out.mask.sum(dim=1).tolist() == [8.0, 8.0]
    target = model.patchify(inputs["pixel_values"])
    per_patch = (out.logits - target).pow(2).mean(-1)  # [B, L]
    torch.testing.assert_close(out.loss, (per_patch * out.mask).sum() / out.mask.sum())


def test_mask_errors_name_the_fix():
    model = tiny_pretraining_model()
    pixels = torch.randn(2, 3, 32, 32)
    uneven = torch.zeros(2, 16, dtype=torch.bool)
    uneven[0, :12], uneven[1, :8] = True, True
    with pytest.raises(ValueError, match=r"masks \[8, 12\] patches in different samples"):
        model(pixels, bool_masked_pos=uneven)
    with pytest.raises(ValueError, match="either bool_masked_pos or noise"):
        model(pixels, bool_masked_pos=uneven, noise=torch.rand(2, 16))
    with pytest.raises(ValueError, match=r"bool_masked_pos has shape \[2, 9\]"):
        model(pixels, bool_masked_pos=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        model(pixels, labels=torch.zeros(2))  # unknown keywords are not silently dropped


def test_per_sample_losses_add_up_to_the_loss():
    model = tiny_pretraining_model()
    pixels, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        out = model(pixels, noise=noise)
    per_patch = (out.logits - model.patchify(pixels)).pow(2).mean(-1)  # [B, L]
    torch.testing.assert_close(out.per_sample_loss, (per_patch * out.mask).sum(-1) / out.mask.sum(-1))
    masked = out.mask.sum(-1)
    torch.testing.assert_close(out.loss, (out.per_sample_loss * masked).sum() / masked.sum())


def test_tuples_and_config_hidden_states():
    model = tiny_pretraining_model(output_hidden_states=True)
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        out = model(pixels, noise=noise)
        as_tuple = model(pixels, noise=noise, return_dict=False)
        encoder_tuple = model.encoder(pixels, return_dict=False)
    assert len(out.hidden_states) == 3  # the config's output_hidden_states, as the other models
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    assert isinstance(encoder_tuple, tuple) and encoder_tuple[0].shape == (2, 17, 32)
