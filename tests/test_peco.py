"""The PeCo tokenizer (`PecoTokenizer`) and its training objective (`hf_mim.tokenizer_training.peco_losses`):
shapes and token grid, loss terms, the perceptual distance, save/load of the EMA codebook, determinism."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from hf_mim import PecoConfig, PecoTokenizer
from hf_mim.models.vit_core import grid_size_for
from hf_mim.tokenizer_training.peco_losses import (
    PecoLoss, hinge_discriminator_loss, load_feature_network_for, perceptual_distance,
)

TINY = dict(image_size=32, downsample_factor=4, hidden_size=16, channel_multipliers=[1, 2, 2], num_res_blocks=1,
            norm_num_groups=8, code_dim=8, num_codes=16, perceptual_layers=[1, 2])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer(seed: int = 0, **overrides) -> PecoTokenizer:
    torch.manual_seed(seed)
    return PecoTokenizer(PecoConfig(**{**TINY, **overrides})).eval()


def images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny random transformers ViT (2 blocks, patch 4) with an image processor: the perceptual network."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("perceptual") / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32,
                       patch_size=4), add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(path)
    return str(path)


def trained(tokenizer: PecoTokenizer, steps: int = 2) -> PecoTokenizer:
    """A few training forwards: k-means initialisation and EMA steps of the codebook."""
    tokenizer.train()
    for step in range(steps):
        tokenizer(images(seed=10 + step))
    return tokenizer.eval()


def test_token_grid_is_the_vit_patch_grid():
    assert PecoConfig().token_grid(224) == grid_size_for(224, 16) == (14, 14)  # the defaults: one token per 16 px patch
    tokenizer = tiny_tokenizer()
    for size in (32, 48):
        ids = tokenizer.get_codebook_indices(images(size=size))
        assert tuple(ids.shape) == (3, *grid_size_for(size, 4)) == (3, *tokenizer.token_grid(size))
    with pytest.raises(ValueError, match="multiple of 4"):
        tokenizer.get_codebook_indices(images(size=30))


def test_shapes_of_every_stage():
    tokenizer = tiny_tokenizer()
    pixels = images()
    features = tokenizer.encode_features(pixels)
    assert features.shape == (3, 8, 8, 8) and features.dtype == torch.float32  # [B, h, w, code_dim]
    output = tokenizer.train()(pixels)
    assert output.reconstruction.shape == pixels.shape and output.indices.shape == (3, 8, 8)
    assert output.pixel_loss.ndim == 0 and output.commitment_loss.ndim == 0
    decoded = tokenizer.eval().decode(output.indices)
    assert decoded.shape == pixels.shape and 0 <= float(decoded.min()) <= float(decoded.max()) <= 1
    # The L1 pixel loss is measured in the model's [-1, 1] space.
    expected = (2 * output.reconstruction - 1 - (2 * pixels - 1)).abs().mean()
    torch.testing.assert_close(output.pixel_loss, expected)


def test_loss_terms_are_present_finite_and_weighted(vit_dir):
    config = PecoConfig(**{**TINY, "perceptual_network_name_or_path": vit_dir, "pixel_loss_weight": 2.0,
                           "perceptual_weight": 0.5})
    torch.manual_seed(0)
    tokenizer = PecoTokenizer(config).train()
    loss = PecoLoss(config, load_feature_network_for(config))
    pixels = images()
    terms = loss(tokenizer(pixels), pixels)
    for name in ("total", "pixel", "commitment", "perceptual"):
        value = getattr(terms, name)
        assert value.ndim == 0 and torch.isfinite(value), name
    assert terms.perceptual.item() > 0 and terms.commitment.item() > 0
    torch.testing.assert_close(terms.total, 2.0 * terms.pixel + terms.commitment + 0.5 * terms.perceptual)
    terms.total.backward()
    assert tokenizer.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert tokenizer.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())  # the network stays frozen


def test_adversarial_term_starts_at_its_step_and_never_trains_the_discriminator(vit_dir):
    config = PecoConfig(**{**TINY, "perceptual_network_name_or_path": vit_dir, "use_adversarial": True,
                           "adversarial_start_step": 5, "discriminator_hidden_size": 8, "discriminator_num_layers": 2})
    torch.manual_seed(0)
    tokenizer = PecoTokenizer(config).train()
    loss = PecoLoss(config, load_feature_network_for(config))
    pixels = images()
    output = tokenizer(pixels)
    before = loss(output, pixels, step=4, last_layer=tokenizer.last_layer_weight())
    assert before.adversarial.item() == 0 and before.adversarial_lambda.item() == 0  # not yet
    after = loss(output, pixels, step=5, last_layer=tokenizer.last_layer_weight())
    assert after.adversarial_lambda.item() > 0 and torch.isfinite(after.total)
    expected = before.total + 0.8 * after.adversarial_lambda * after.adversarial  # adversarial_weight 0.8
    torch.testing.assert_close(after.total, expected)
    after.total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())  # the tokenizer's term leaves D alone
    d_loss = loss.discriminator_loss(pixels, output.reconstruction)
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert tokenizer.decoder.conv_out.weight.grad is not None
    logits = torch.tensor([2.0, -0.5]), torch.tensor([-2.0, 0.5])  # hinge: only margins inside +-1 count
    assert hinge_discriminator_loss(*logits).item() == pytest.approx(0.5 * (1.5 / 2 + 1.5 / 2))


def test_perceptual_distance_is_zero_for_identical_images_only(vit_dir):
    network = load_feature_network_for(PecoConfig(**{**TINY, "perceptual_network_name_or_path": vit_dir}))
    network.train()  # asked to train, it stays in eval mode
    assert not network.model.training
    pixels = images()
    same = perceptual_distance(network, pixels, pixels.clone(), [1.0, 1.0])
    assert same.shape == (3,) and torch.equal(same, torch.zeros(3))
    reconstruction = (pixels + 0.1 * torch.randn_like(pixels)).requires_grad_(True)  # may overshoot [0, 1]
    different = perceptual_distance(network, pixels, reconstruction, [1.0, 1.0])
    assert (different > 0).all()
    different.sum().backward()
    assert reconstruction.grad.abs().sum() > 0  # the reconstruction learns from it
    weighted = perceptual_distance(network, pixels, reconstruction.detach(), [1.0, 0.0])
    assert (weighted < different.detach()).all()  # the second layer's term is gone


def test_save_and_bf16_load_keep_the_codebook_buffers_float32(tmp_path):
    tokenizer = trained(tiny_tokenizer())
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert isinstance(loaded, PecoTokenizer)
    quantizer = loaded.quantize
    for name in ("embedding.weight", "initted", "steps_since_used"):
        saved, restored = tokenizer.quantize.get_buffer(name), quantizer.get_buffer(name)
        assert restored.dtype == torch.float32 and torch.equal(restored, saved), name
    assert float(quantizer.initted) == 1.0  # loaded: never re-initialised by k-means
    assert loaded.quant_conv.weight.dtype == torch.float32  # the projection into the code space too
    assert loaded.encoder.conv_in.weight.dtype == torch.bfloat16  # the rest in the requested dtype
    assert loaded.get_codebook_indices(images()).shape == (3, 8, 8)


def test_get_codebook_indices_is_deterministic_and_never_updates_the_codebook():
    tokenizer = trained(tiny_tokenizer())
    codebook = tokenizer.quantize.embedding.weight.clone()
    pixels = images(batch=4, seed=5)
    first = tokenizer.get_codebook_indices(pixels)
    assert torch.equal(first, tokenizer.get_codebook_indices(pixels))
    tokenizer(pixels)  # an evaluation forward: no EMA step either
    assert torch.equal(tokenizer.quantize.embedding.weight, codebook)
    assert torch.equal(first, tokenizer.eval()(pixels).indices)
    tokenizer.train()(pixels)  # a training forward does take one
    assert not torch.equal(tokenizer.quantize.embedding.weight, codebook)


def test_bad_settings_name_the_fix(vit_dir):
    deep = PecoConfig(**{**TINY, "perceptual_network_name_or_path": vit_dir, "perceptual_layers": [3, 6]})
    with pytest.raises(ValueError, match=r"perceptual_layers \[3, 6\].*2 blocks"):
        load_feature_network_for(deep)
    with pytest.raises(ValueError, match="--perceptual_model"):
        load_feature_network_for(PecoConfig(**TINY))
    with pytest.raises(ValueError, match="0, 1"):
        tiny_tokenizer().get_codebook_indices(images() * 255)
