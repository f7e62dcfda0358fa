"""BEiT v2's VQ-KD tokenizer: the encoder against transformers' BEiT, indices and loss against their
formulas, float32 codebook under bf16 loading, saving and remote-code loading, the teacher wrappers
(CLIP, ViT, DINOv2 with registers, hf_mim MAE), the ``vqkd`` converter, and a short distillation run
on the digits data set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoModel

from hf_mim import MaeConfig, MaeForPreTraining, VqkdConfig, VqkdTokenizer
from hf_mim.convert.__main__ import main as convert_main
from hf_mim.convert.vqkd import default_fields
from hf_mim.teachers import TeacherLoadError, load_teacher, load_teacher_for


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: thread start-up costs more than it gives, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=64,
    code_dim=8, num_codes=32, teacher_dim=16, teacher_name_or_path=None, teacher_type="auto",
)


def tiny_config(**overrides) -> VqkdConfig:
    return VqkdConfig(**{**TINY, **overrides})


def tiny_tokenizer(seed: int = 0, **overrides) -> VqkdTokenizer:
    torch.manual_seed(seed)
    return VqkdTokenizer(tiny_config(**overrides)).eval()


def images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (zero-initialised biases and unit LayerNorm gains included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def trained(tokenizer: VqkdTokenizer, steps: int = 3) -> VqkdTokenizer:
    """A few training forwards: k-means initialisation, EMA steps, a usage history."""
    tokenizer.train()
    for step in range(steps):
        tokenizer(images(seed=10 + step), teacher_features=torch.randn(3, 16, 16))
    return tokenizer.eval()


# ---------------------------------------------------------------------------------------------
# The model against transformers and the formulas
# ---------------------------------------------------------------------------------------------


def test_encoder_matches_transformers_beit_with_absolute_positions(tmp_path):
    """The encoder is BEiT with learned absolute positions, no layer scale and no relative bias, and
    ``fc_norm`` (transformers' mean-pooling LayerNorm) applied to every patch token."""
    from transformers import BeitConfig as TransformersBeitConfig
    from transformers import BeitModel as TransformersBeitModel

    from hf_mim.convert.beit import read_transformers_dir

    reference = TransformersBeitModel(TransformersBeitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        layer_norm_eps=1e-6, use_absolute_position_embeddings=True, use_relative_position_bias=False,
        use_shared_relative_position_bias=False, layer_scale_init_value=0.0, use_mean_pooling=True,
    ))
    randomize_(reference).eval().save_pretrained(tmp_path)
    weights, _ = read_transformers_dir(str(tmp_path))  # reference (timm/BEiT) names, q/k/v fused
    weights = {key.replace("pooler.layernorm.", "fc_norm."): value for key, value in weights.items()}
    tokenizer = tiny_tokenizer()
    tokenizer.encoder.load_state_dict(weights, strict=True)
    pixels = images()
    with torch.no_grad():
        hidden = reference(pixels).last_hidden_state  # [B, 1+N, D], no final norm with mean pooling
        expected = reference.pooler.layernorm(hidden[:, 1:])
        ours = tokenizer.encoder(pixels)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the comparison sees the positions
        tokenizer.encoder.pos_embed.zero_()
        assert not torch.allclose(tokenizer.encoder(pixels), expected, atol=1e-3)


def test_shapes_token_grid_and_other_image_sizes():
    tokenizer = randomize_(tiny_tokenizer())
    assert tokenizer.vocab_size == 32 and tokenizer.token_grid(32) == (4, 4)
    assert tokenizer.token_grid((48, 32)) == (6, 4)
    ids = tokenizer.get_codebook_indices(images())
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 32
    output = tokenizer(images(), teacher_features=torch.randn(3, 16, 16))
    assert output.indices.shape == (3, 4, 4) and output.predicted_features.shape == (3, 16, 16)
    assert output.loss.ndim == 0 and output.codebook_usage.ndim == 0 and output.perplexity >= 1
    # Other grids: the position tables are resized.
    assert tokenizer.get_codebook_indices(torch.rand(2, 3, 48, 32)).shape == (2, 6, 4)
    assert tokenizer(torch.rand(2, 3, 48, 32)).predicted_features.shape == (2, 24, 16)


@pytest.mark.parametrize("pixels, message", [
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "divide uint8 by 255"),
    ((torch.rand(2, 3, 32, 32) - 0.45) / 0.22, "Do not normalise"),
    (torch.rand(2, 1, 32, 32), "[B, 3, H, W]"),
    (torch.rand(2, 3, 30, 32), "not divisible by the patch size"),
])
def test_bad_pixels_raise_clear_errors(pixels, message):
    with pytest.raises(ValueError, match=None) as error:
        tiny_tokenizer().get_codebook_indices(pixels)
    assert message in str(error.value)


def test_indices_are_the_nearest_cosine_code_and_deterministic():
    tokenizer = trained(randomize_(tiny_tokenizer()))
    pixels = images(seed=5)
    with torch.no_grad():
        tokens = tokenizer.encoder(2 * pixels - 1)  # [B, N, D]: pixels mapped to [-1, 1]
        first, _, second = tokenizer.encode_task_layer
        vectors = F.normalize(second(torch.tanh(first(tokens))), dim=-1)  # [B, N, code_dim]
        similarity = vectors @ tokenizer.quantize.embedding.weight.T  # [B, N, K]
    expected = similarity.argmax(dim=-1).view(3, 4, 4)
    margins = similarity.topk(2, dim=-1).values
    assert (margins[..., 0] - margins[..., 1]).min() > 1e-5  # no near-ties that rounding could flip
    ids = tokenizer.get_codebook_indices(pixels)
    assert torch.equal(ids, expected)
    assert torch.equal(tokenizer.get_codebook_indices(pixels), ids)  # deterministic, no codebook update in eval
    assert torch.equal(tokenizer(pixels).indices, ids)
    assert len(ids.unique()) > 1  # a non-trivial comparison


def test_loss_is_one_minus_cosine_per_patch_plus_commitment():
    tokenizer = trained(randomize_(tiny_tokenizer()))
    pixels, teacher = images(seed=6), torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output = tokenizer(pixels, teacher_features=teacher)
        vectors = F.normalize(tokenizer.encode_features(pixels), dim=-1)  # [B, h, w, code_dim]
        codes = tokenizer.quantize.embedding.weight[output.indices]  # [B, h, w, code_dim]
        decoded = tokenizer.decode_task_layer(tokenizer.decoder(codes.permute(0, 3, 1, 2)))  # [B, N, T]
    torch.testing.assert_close(output.predicted_features, decoded)
    torch.testing.assert_close(tokenizer.decode_features(output.indices), decoded)
    distillation = (1 - F.cosine_similarity(decoded, teacher, dim=-1)).mean()  # mean over B * N patches
    commitment = ((codes - vectors) ** 2).mean()
    torch.testing.assert_close(output.distillation_loss, distillation)
    torch.testing.assert_close(output.commitment_loss, commitment)
    torch.testing.assert_close(output.loss, distillation + commitment)
    # teacher features on the grid ([B, h, w, T]) are accepted too
    grid = tokenizer(pixels, teacher_features=teacher.view(3, 4, 4, 16))
    torch.testing.assert_close(grid.loss, output.loss)


def test_training_step_gradients_and_codebook_updates():
    tokenizer = randomize_(tiny_tokenizer()).train()
    assert tokenizer.quantize.initted.item() == 0
    output = tokenizer(images(), teacher_features=torch.randn(3, 16, 16))
    assert tokenizer.quantize.initted.item() == 1  # k-means on the first training batch
    output.loss.backward()
    for name in ("encoder.patch_embed.proj.weight", "encode_task_layer.2.weight", "decoder.blocks.0.attn.qkv.weight",
                 "decode_task_layer.2.weight"):
        assert tokenizer.get_parameter(name).grad.abs().sum() > 0, name  # the straight-through estimator
    assert "quantize.embedding.weight" not in dict(tokenizer.named_parameters())  # updated by EMA only
    before = tokenizer.quantize.embedding.weight.clone()
    tokenizer(images(seed=3), teacher_features=torch.randn(3, 16, 16))
    assert not torch.equal(tokenizer.quantize.embedding.weight, before)
    with pytest.raises(ValueError, match="needs teacher_features"):
        tokenizer(images())


def test_activation_checkpointing_and_attention_kernels_agree():
    """Only the blocks are checkpointed: the quantizer's EMA step runs once per training forward."""
    plain, checkpointed = randomize_(tiny_tokenizer()).train(), tiny_tokenizer().train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    pixels, teacher = images(), torch.randn(3, 16, 16)
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)  # the k-means initialisation samples its starting codes
        loss = model(pixels, teacher_features=teacher).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    assert torch.equal(plain.quantize.embedding.weight, checkpointed.quantize.embedding.weight)
    torch.testing.assert_close(plain.encoder.patch_embed.proj.weight.grad,
                               checkpointed.encoder.patch_embed.proj.weight.grad)
    plain.eval()
    outputs = []
    for implementation in ("eager", "sdpa"):
        plain.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs.append(plain(pixels).predicted_features)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def test_reference_init():
    tokenizer = tiny_tokenizer(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3)
    encoder = tokenizer.encoder
    for token in (encoder.cls_token, encoder.pos_embed):
        assert 0.015 < token.std() < 0.025
    for layer_id, block in enumerate(encoder.blocks, start=1):  # residual projections divided by sqrt(2 i)
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert weight.std().item() / (0.02 / (2 * layer_id) ** 0.5) == pytest.approx(1.0, abs=0.12)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert not block.attn.q_bias.any() and block.gamma_1 is None
    conv = encoder.patch_embed.proj.weight  # PyTorch's default: uniform in +-1/sqrt(fan_in)
    assert conv.abs().max() <= conv[0].numel() ** -0.5 and conv.std() > 0.3 * conv[0].numel() ** -0.5
    codebook = tokenizer.quantize.embedding.weight
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(32))
    assert tokenizer.quantize.initted.item() == 0


# ---------------------------------------------------------------------------------------------
# Precision, saving, remote code
# ---------------------------------------------------------------------------------------------


def test_bf16_loading_keeps_codebook_and_code_projection_float32(tmp_path):
    tokenizer = trained(randomize_(tiny_tokenizer()))
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16  # really loaded in bf16
    assert loaded.decode_task_layer[0].weight.dtype == torch.bfloat16
    for name, value in tokenizer.state_dict().items():
        if name.startswith(("quantize.", "encode_task_layer.")):
            assert loaded.state_dict()[name].dtype == torch.float32, name
            assert torch.equal(loaded.state_dict()[name], value), name
    pixels = images(seed=8)
    features = loaded.encode_features(pixels)
    assert features.dtype == torch.float32
    agree = (loaded.get_codebook_indices(pixels) == tokenizer.get_codebook_indices(pixels)).float().mean()
    assert agree > 0.7  # bf16 encoder, fp32 code projection and codebook
    loaded.train()  # training in bf16 works: the EMA step runs on the float32 codebook
    output = loaded(pixels, teacher_features=torch.randn(3, 16, 16))
    output.loss.backward()
    assert torch.isfinite(output.loss) and loaded.quantize.embedding.weight.dtype == torch.float32
    # Mixed precision (autocast) on the float32 model: the code projection still runs in float32.
    tokenizer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tokenizer.encode_features(pixels).dtype == torch.float32
        output = tokenizer(pixels, teacher_features=torch.randn(3, 16, 16))
    assert output.predicted_features.dtype == torch.bfloat16 and output.loss.dtype == torch.float32
    output.loss.backward()
    assert torch.isfinite(output.loss) and tokenizer.quantize.embedding.weight.dtype == torch.float32


def test_save_load_round_trip_without_teacher(tmp_path):
    tokenizer = trained(randomize_(tiny_tokenizer(teacher_layer=-2, dead_code_restart=True)))
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is VqkdTokenizer
    assert loaded.config.teacher_layer == -2 and loaded.config.dead_code_restart is True
    assert loaded.config.teacher_image_mean == list(tokenizer.config.teacher_image_mean)
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pixels = images(seed=4)
    assert torch.equal(loaded.get_codebook_indices(pixels), tokenizer.get_codebook_indices(pixels))
    with safe_open(tmp_path / "model.safetensors", "pt") as file:
        assert set(file.keys()) == set(tokenizer.state_dict())
        assert {"quantize.embedding.weight", "quantize.initted", "quantize.steps_since_used"} <= set(file.keys())
    # transformers would record a class named "...Tokenizer" as a (slow, fast) text-tokenizer pair
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_vqkd.VqkdTokenizer"
    # Training resumes with an EMA step on the loaded codebook, not a new k-means.
    loaded.train()
    before = loaded.quantize.embedding.weight.clone()
    loaded(pixels, teacher_features=torch.randn(3, 16, 16))
    moved = (loaded.quantize.embedding.weight - before).norm(dim=1)
    assert 0 < moved.max() < 0.2


def test_remote_code_load_without_package(tmp_path):
    tokenizer = trained(randomize_(tiny_tokenizer()))
    tokenizer.save_pretrained(tmp_path / "saved")
    for name in ("modeling_vqkd.py", "configuration_vqkd.py", "quantizer.py", "vit_core.py", "remote_code.py"):
        assert (tmp_path / "saved" / name).exists(), name
    pixels = images()
    torch.save(pixels, tmp_path / "pixels.pt")
    script = f"""
import sys
sys.modules["hf_mim"] = None  # any import of the package fails
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / "saved")!r}, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("hf_mim"), type(model).__module__
pixels = torch.load({str(tmp_path / "pixels.pt")!r})
torch.save({{"ids": model.get_codebook_indices(pixels), "features": model(pixels).predicted_features}},
           {str(tmp_path / "result.pt")!r})
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert torch.equal(result["ids"], tokenizer.get_codebook_indices(pixels))
    with torch.no_grad():
        torch.testing.assert_close(result["features"], tokenizer(pixels).predicted_features)


# ---------------------------------------------------------------------------------------------
# Teachers (hf_mim.teachers): tiny models built from configs, saved to temporary directories
# ---------------------------------------------------------------------------------------------

CLIP_MEAN, CLIP_STD = [0.1, 0.2, 0.3], [0.5, 0.4, 0.3]


def normalized(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def save_tiny_vit(path, patch_size: int = 8, hidden_size: int = 16, seed: int = 0, processor: bool = True):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    vit = ViTModel(ViTConfig(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=patch_size, layer_norm_eps=1e-6)).eval()
    vit.save_pretrained(path)
    if processor:
        ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(path)
    return vit


@pytest.fixture
def clip_dir(tmp_path):
    """A whole tiny CLIPModel (text tower included) with its image processor, as the Hub's CLIP repos."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    clip = randomize_(CLIPModel(config)).eval()
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(tmp_path / "clip")
    return tmp_path / "clip", clip


def test_clip_teacher_applies_post_layernorm_and_projection_to_patch_tokens(clip_dir):
    path, clip = clip_dir
    teacher = load_teacher(str(path), teacher_type="clip")
    assert teacher.feature_dim == 16 and teacher.normalization_source == "the teacher's image processor"
    pixels = images()
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=normalized(pixels, CLIP_MEAN, CLIP_STD)).last_hidden_state
        expected = clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 1:]))  # [B, N, 16]
        without_norm = clip.visual_projection(hidden[:, 1:])  # what transformers' last_hidden_state would give
    features = teacher(pixels)
    assert features.shape == (3, 16, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(features, without_norm, atol=1e-2)
    # frozen: no gradients, and eval mode whatever the caller asks
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.train().model.training
    with pytest.raises(ValueError, match="do not normalise them"):
        teacher(normalized(pixels, CLIP_MEAN, CLIP_STD))
    # teacher_type "auto" detects CLIP; the raw hidden states of a layer on request
    auto = load_teacher(str(path), layer=1)
    assert auto.is_clip and auto.feature_dim == 24
    with torch.no_grad():
        states = clip.vision_model(pixel_values=normalized(pixels, CLIP_MEAN, CLIP_STD), output_hidden_states=True)
    torch.testing.assert_close(auto(pixels), states.hidden_states[1][:, 1:], atol=1e-5, rtol=1e-4)


def test_vit_and_dinov2_with_registers_teachers_drop_prefix_tokens(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    vit = save_tiny_vit(tmp_path / "vit")
    teacher = load_teacher(str(tmp_path / "vit"))
    pixels = images()
    with torch.no_grad():
        expected = vit(normalized(pixels, [0.5] * 3, [0.25] * 3)).last_hidden_state[:, 1:]
    torch.testing.assert_close(teacher(pixels), expected, atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8,
        num_register_tokens=2,
    )).eval()
    dino.save_pretrained(tmp_path / "dino")
    teacher = load_teacher(str(tmp_path / "dino"), image_mean=[0.4] * 3, image_std=[0.2] * 3)
    assert teacher.normalization_source.startswith("the values given")
    with torch.no_grad():
        expected = dino(normalized(pixels, [0.4] * 3, [0.2] * 3)).last_hidden_state[:, 3:]  # CLS + 2 registers first
    torch.testing.assert_close(teacher(pixels), expected, atol=1e-5, rtol=1e-4)


def test_hf_mim_mae_teacher_and_the_tokenizer_config_route(tmp_path):
    torch.manual_seed(0)
    mae = MaeForPreTraining(MaeConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8,
        decoder_hidden_size=16, decoder_num_attention_heads=2, decoder_num_hidden_layers=1,
        decoder_intermediate_size=32,
    )).eval()
    mae.save_pretrained(tmp_path / "mae")
    config = tiny_config(teacher_name_or_path=str(tmp_path / "mae"), teacher_dim=16,
                         teacher_image_mean=[0.3] * 3, teacher_image_std=[0.2] * 3)
    teacher = load_teacher_for(config)  # no image processor saved: the config's mean/std
    assert type(teacher.model).__name__ == "MaeModel" and teacher.feature_dim == 16
    pixels = images()
    with torch.no_grad():
        expected = mae.encoder(normalized(pixels, [0.3] * 3, [0.2] * 3)).last_hidden_state[:, 1:]
    features = teacher(pixels)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
    # One training step with the teacher, then the saved tokenizer holds no teacher weight.
    tokenizer = tiny_tokenizer(teacher_name_or_path=str(tmp_path / "mae")).train()
    tokenizer(pixels, teacher_features=teacher(pixels)).loss.backward()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    with safe_open(tmp_path / "tokenizer" / "model.safetensors", "pt") as file:
        keys = set(file.keys())
    assert keys == set(tokenizer.state_dict())
    assert not any(key.startswith(("teacher", "model.", "encoder.encoder")) for key in keys)
    assert not (tmp_path / "tokenizer" / "teachers.py").exists()
    teacher_keys = {f"model.{key}" for key in teacher.model.state_dict()}
    assert teacher_keys and not teacher_keys & keys


def test_grid_and_feature_size_mismatches_name_the_fix(tmp_path):
    save_tiny_vit(tmp_path / "vit4", patch_size=4)  # an 8x8 grid at 32 px; the tokenizer's is 4x4
    config = tiny_config(teacher_name_or_path=str(tmp_path / "vit4"))
    with pytest.raises(ValueError, match=r"teacher_input_size=16") as error:
        load_teacher_for(config)
    assert "8x8 patch grid" in str(error.value) and "4x4" in str(error.value)
    # The fix: feed the teacher 16 px images (its position embeddings are interpolated).
    teacher = load_teacher_for(tiny_config(teacher_name_or_path=str(tmp_path / "vit4"), teacher_input_size=16))
    pixels = images()
    features = teacher(pixels)
    assert features.shape == (3, 16, 16)
    tokenizer = tiny_tokenizer().train()
    assert torch.isfinite(tokenizer(pixels, teacher_features=features).loss)
    # Feature size: the error names teacher_dim.
    save_tiny_vit(tmp_path / "vit8", hidden_size=24)
    with pytest.raises(ValueError, match=r"build the tokenizer with teacher_dim=24"):
        load_teacher_for(tiny_config(teacher_name_or_path=str(tmp_path / "vit8")))
    # The tokenizer checks what it is given too.
    with pytest.raises(ValueError, match=r"teacher_dim=24"):
        tokenizer(pixels, teacher_features=torch.randn(3, 16, 24))
    with pytest.raises(ValueError, match=r"grid differs"):
        tokenizer(pixels, teacher_features=torch.randn(3, 17, 16))


def test_unloadable_teachers_and_nan_features_raise_clear_errors(tmp_path, clip_dir):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    missing = tmp_path / "missing"
    with pytest.raises(TeacherLoadError, match="there is no directory") as error:
        load_teacher(str(missing))
    assert str(missing) in str(error.value)
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps({"model_type": "vit", "patch_size": 8}))
    with pytest.raises(TeacherLoadError, match="Could not load the teacher weights") as error:
        load_teacher(str(tmp_path / "no_weights"), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert str(tmp_path / "no_weights") in str(error.value)
    save_tiny_vit(tmp_path / "vit")
    with pytest.raises(TeacherLoadError, match="teacher_type='auto'"):
        load_teacher(str(tmp_path / "vit"), teacher_type="clip")
    # A CLIP vision tower saved without its projection: a partly random teacher is refused.
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "clip_vision")
    with pytest.raises(TeacherLoadError, match=r"visual_projection"):
        load_teacher(str(tmp_path / "clip_vision"), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # NaN features stop at the teacher forward, naming the step.
    teacher = load_teacher(str(clip_dir[0]))
    with torch.no_grad():
        teacher.model.visual_projection.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Teacher forward"):
        teacher(images())
    tokenizer = tiny_tokenizer().train()
    bad = torch.randn(3, 16, 16)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="teacher forward failed"):
        tokenizer(images(), teacher_features=bad)
    assert tokenizer.quantize.initted.item() == 0  # checked before the quantizer's training step


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------


def reference_checkpoint(tokenizer: VqkdTokenizer) -> dict:
    """The tokenizer's weights as the reference saves them: with the teacher, its input scaling and
    the reference quantizer's statistics, without hf_mim's quantizer buffers."""
    state = {k: v.clone() for k, v in tokenizer.state_dict().items() if k not in ("quantize.initted",
                                                                                   "quantize.steps_since_used")}
    codebook = state["quantize.embedding.weight"]
    state.update({
        "quantize.cluster_size": torch.rand(32), "quantize.embedding.cluster_size": torch.rand(32),
        "quantize.embedding.embed_avg": codebook * 3.0, "quantize.embedding.initted": torch.tensor([1.0]),
        "teacher_model.visual.proj": torch.randn(24, 16), "teacher_model.visual.conv1.weight": torch.randn(24, 3, 8, 8),
        "scaling_layer.shift": torch.rand(1, 3, 1, 1), "scaling_layer.scale": torch.rand(1, 3, 1, 1),
    })
    return state


def test_converter_reference_checkpoint_drops_the_teacher(tmp_path, capsys):
    source = trained(randomize_(tiny_tokenizer(decoder_num_hidden_layers=3, intermediate_size=48)))
    torch.save({"model": reference_checkpoint(source)}, tmp_path / "vqkd.pth")
    assert convert_main(["vqkd", str(tmp_path / "vqkd.pth"), str(tmp_path / "out"), "--config",
                         "num_attention_heads=2", "decoder_num_attention_heads=2",
                         "teacher_name_or_path=my/teacher", "teacher_type=auto"]) == 0
    printed = capsys.readouterr().out
    assert "Dropped 4 teacher/scaling/loss key(s)" in printed and "Dropped 4 reference quantizer statistics" in printed
    converted = AutoModel.from_pretrained(tmp_path / "out").eval()
    config = converted.config
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == (32, 8, 32, 2)
    assert (config.intermediate_size, config.decoder_num_hidden_layers) == (48, 3)
    assert (config.code_dim, config.num_codes) == (8, 32)
    assert config.teacher_dim == 16 and config.teacher_name_or_path == "my/teacher" and config.qkv_bias
    for key, value in source.state_dict().items():
        if key != "quantize.steps_since_used":
            assert torch.equal(converted.state_dict()[key], value), key
    assert converted.quantize.initted.item() == 1  # training resumes with EMA steps, not k-means
    assert not converted.quantize.steps_since_used.any()
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as file:
        assert not any(key.startswith(("teacher", "scaling")) or "cluster_size" in key for key in file.keys())
    pixels = images()
    assert torch.equal(converted.get_codebook_indices(pixels), source.get_codebook_indices(pixels))


def test_converter_defaults_for_the_published_shapes():
    """Heads and teacher for the published tokenizers (ViT-B widths; CLIP 512 or DINO 768 targets)."""
    fields = {"hidden_size": 768, "decoder_hidden_size": 768, "teacher_dim": 512}
    clip = default_fields(fields, {})
    assert clip["num_attention_heads"] == clip["decoder_num_attention_heads"] == 12
    assert clip["teacher_name_or_path"] == "openai/clip-vit-base-patch16" and clip["teacher_type"] == "clip"
    dino = default_fields({**fields, "teacher_dim": 768}, {})
    assert dino["teacher_name_or_path"] == "facebook/dino-vitb16" and dino["teacher_image_mean"][0] == 0.485
    assert VqkdConfig(**clip).teacher_image_std[0] == pytest.approx(0.26862954)  # CLIP's by default


def test_converter_errors(tmp_path, capsys):
    source = tiny_tokenizer()
    torch.save({"model": reference_checkpoint(source)}, tmp_path / "vqkd.pth")
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}}, tmp_path / "beit.pth")
    src, out = str(tmp_path / "vqkd.pth"), str(tmp_path / "o")
    heads = ["num_attention_heads=2", "decoder_num_attention_heads=2", "teacher_name_or_path=t"]
    cases = [
        ([src, out], "Pass --config num_attention_heads=N"),
        ([src, out, "--config", *heads, "code_dim=16"], "the weights have code_dim=8"),
        ([src, out, "--config", *heads, "nmu_codes=3"], "not VqkdConfig fields"),
        ([str(tmp_path / "beit.pth"), out], "is not a VQ-KD tokenizer checkpoint"),
        ([str(tmp_path / "missing.pth"), out], "No checkpoint"),
    ]
    for args, message in cases:
        assert convert_main(["vqkd", *args]) == 2, args
        assert message in capsys.readouterr().err, (args, message)
    with pytest.warns(UserWarning, match="teacher_dim=16 matches no published teacher"):
        assert convert_main(["vqkd", src, out, "--config", *heads[:2]]) == 0
    assert AutoModel.from_pretrained(out).config.teacher_name_or_path is None


# ---------------------------------------------------------------------------------------------
# Learning: distilling a fixed random ViT on the digits data set
# ---------------------------------------------------------------------------------------------


def digits_images() -> torch.Tensor:
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    upscaled = F.interpolate(digits[:, None], size=32, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return upscaled.repeat(1, 3, 1, 1)  # [1797, 3, 32, 32]


def test_distillation_learns_on_digits_and_uses_the_codebook(tmp_path):
    save_tiny_vit(tmp_path / "teacher", hidden_size=32)  # random but fixed: a teacher with image-dependent features
    teacher = load_teacher(str(tmp_path / "teacher"))
    pixels = digits_images()
    train, held_out = pixels[:1500], pixels[1500:]
    held_out_targets = teacher(held_out)  # [297, 16, 32]
    # The best prediction that ignores the image: each position's mean teacher direction.
    mean_direction = F.normalize(teacher(train), dim=-1).mean(dim=0, keepdim=True)
    constant_loss = (1 - F.cosine_similarity(mean_direction, held_out_targets, dim=-1)).mean().item()

    tokenizer = tiny_tokenizer(num_codes=16, teacher_dim=32, decoder_num_hidden_layers=1)

    def held_out_loss_and_codes_used() -> tuple[float, int]:
        tokenizer.eval()
        with torch.no_grad():
            output = tokenizer(held_out, teacher_features=held_out_targets)
        return output.distillation_loss.item(), len(output.indices.unique())

    before, _ = held_out_loss_and_codes_used()
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokenizer.train()
    for _ in range(200):
        batch = train[torch.randint(0, len(train), (64,), generator=generator)]
        output = tokenizer(batch, teacher_features=teacher(batch))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    after, codes_used = held_out_loss_and_codes_used()
    assert before > constant_loss  # an untrained decoder is worse than the constant guess (~1.0 vs ~0.3)
    assert after < 0.5 * constant_loss  # ~0.06: the codes carry what the teacher sees in each patch
    assert codes_used > 8  # more than half of the 16 codes in use on held-out images
