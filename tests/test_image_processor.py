"""MimImageProcessor (torchvision) and MimImageProcessorPil: values against a manual torchvision
pipeline, the two backends against each other, patch order against the model, masks, channel
counts, saving, Auto-class loading with and without hf_mim, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF
from transformers import AutoImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

import hf_mim
from hf_mim import MaeConfig, MaeModel, MimImageProcessor, MimImageProcessorPil
from hf_mim.models.masking import build_mask_generator
from hf_mim.models.vit_core import PatchEmbed, patchify
from hf_mim.registry import FAMILIES

BACKENDS = [MimImageProcessor, MimImageProcessorPil]


def smooth_image(height: int, width: int, channels: int = 3, phase: float = 0.0) -> np.ndarray:
    """uint8 [H, W, C] made of low-frequency waves, where bicubic resizers agree closely."""
    rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    waves = [0.5 + 0.5 * np.sin(3 * cols + 2 * rows + phase + 1.3 * k) for k in range(channels)]
    return np.round(255 * np.stack(waves, -1)).astype(np.uint8)


def noise_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Pixel values
# ---------------------------------------------------------------------------------------------


def test_defaults_match_a_manual_torchvision_pipeline():
    processor = MimImageProcessor()
    images = [noise_image(40, 50, seed=0), noise_image(30, 20, seed=1)]
    out = processor(images, return_tensors="pt")
    assert set(out) == {"pixel_values"}  # nothing extra unless asked
    assert out.pixel_values.shape == (2, 3, 224, 224) and out.pixel_values.dtype == torch.float32
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    for image, pixels in zip(images, out.pixel_values):
        chw = torch.from_numpy(image).permute(2, 0, 1)
        resized = tvF.resize(chw, [224, 224], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        expected = (resized.float() / 255 - mean) / std  # resize 224x224 bicubic, no crop, ImageNet stats
        torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (64, 96)])
def test_pil_backend_matches_torchvision(size):
    kwargs = dict(size={"height": size[0], "width": size[1]}, patch_size=16, do_patchify=True)
    images = [smooth_image(32, 32, phase=0.3), Image.fromarray(smooth_image(150, 120, phase=1.0))]
    fast = MimImageProcessor(**kwargs)(images, return_tensors="pt")
    pil = MimImageProcessorPil(**kwargs)(images, return_tensors="pt")
    assert fast.pixel_values.shape == pil.pixel_values.shape == (2, 3, *size)
    difference = (fast.pixel_values - pil.pixel_values).abs()
    # The backends' bicubic kernels differ (PIL a=-0.5, torchvision a=-0.75) and both round to
    # uint8 (0.5 / 255 / 0.225 ~ 0.009 after normalising): ~0.03 at most, far less on average.
    assert difference.max() < 0.04 and difference.mean() < 0.01
    torch.testing.assert_close(fast.patches, patchify(fast.pixel_values, 16))
    torch.testing.assert_close(pil.patches, patchify(pil.pixel_values, 16))


def test_pil_backend_returns_numpy_without_return_tensors():
    out = MimImageProcessorPil(do_patchify=True, mask_generator="random")(smooth_image(20, 20), seed=0)
    assert all(isinstance(value[0], np.ndarray) for value in out.values())
    out = MimImageProcessor(do_patchify=True, mask_generator="random")(smooth_image(20, 20), seed=0)
    assert all(isinstance(value[0], torch.Tensor) for value in out.values())


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_patches_are_in_the_models_token_order(processor_class):
    patch = (8, 16)
    processor = processor_class(size={"height": 32, "width": 64}, patch_size=list(patch), do_patchify=True)
    out = processor([smooth_image(50, 70), smooth_image(40, 40, phase=2.0)], return_tensors="pt")
    pixels, patches = out.pixel_values, out.patches  # [2, 3, 32, 64], [2, 4*4, 8*16*3]
    assert patches.shape == (2, 16, 8 * 16 * 3)
    torch.testing.assert_close(patches, patchify(pixels, patch), rtol=0, atol=0)
    # Patch n = row-major grid cell (r, c); its vector is ordered (row, column, channel).
    row, col = 2, 3
    block = pixels[1, :, row * 8 : (row + 1) * 8, col * 16 : (col + 1) * 16]  # [3, 8, 16]
    torch.testing.assert_close(patches[1, row * 4 + col], block.permute(1, 2, 0).reshape(-1), rtol=0, atol=0)
    # Same order as the model's tokens: a Linear with the patch-embedding weights in (row, col,
    # channel) order applied to the patches reproduces PatchEmbed's output token by token.
    embed = PatchEmbed(patch, num_channels=3, embed_dim=5)
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(5, -1)  # [D, ph*pw*C]
    torch.testing.assert_close(patches @ weight.T + embed.proj.bias, embed(pixels), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Channels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_one_channel_images(processor_class):
    processor = processor_class(
        image_mean=[0.5], image_std=[0.25], do_convert_rgb=False, size={"height": 32, "width": 48}, patch_size=8,
        do_patchify=True,
    )
    gray = smooth_image(40, 40, channels=1)
    out = processor([gray, Image.fromarray(gray[..., 0], mode="L")], return_tensors="pt")
    assert out.pixel_values.shape == (2, 1, 32, 48) and out.patches.shape == (2, 24, 64)
    torch.testing.assert_close(out.pixel_values[0], out.pixel_values[1])  # array and PIL "L" agree
    resized = tvF.resize(torch.from_numpy(gray).permute(2, 0, 1), [32, 48], interpolation=tvF.InterpolationMode.BICUBIC)
    tolerance = 1e-5 if processor_class is MimImageProcessor else 0.04
    torch.testing.assert_close(out.pixel_values[0], (resized.float() / 255 - 0.5) / 0.25, rtol=0, atol=tolerance)
    # By default (do_convert_rgb=True) grayscale becomes RGB for the ImageNet statistics.
    assert processor_class()(gray, return_tensors="pt").pixel_values.shape == (1, 3, 224, 224)


@pytest.mark.parametrize("channels", [4, 5, 2])
def test_other_channel_counts_on_both_backends(channels):
    kwargs = dict(image_mean=[0.5] * channels, image_std=[0.25] * channels, do_convert_rgb=False,
                  size={"height": 32, "width": 48}, patch_size=8)
    image = smooth_image(40, 40, channels=channels).transpose(2, 0, 1)  # [C, H, W]
    fast = MimImageProcessor(**kwargs)(image, input_data_format="channels_first", return_tensors="pt")
    pil = MimImageProcessorPil(**kwargs)(image, input_data_format="channels_first", return_tensors="pt")
    assert fast.pixel_values.shape == pil.pixel_values.shape == (1, channels, 32, 48)
    assert (fast.pixel_values - pil.pixel_values).abs().max() < 0.04
    if channels == 4:  # RGBA -> RGB when asked
        rgb = MimImageProcessor(size={"height": 32, "width": 48})(image, input_data_format="channels_first")
        assert rgb.pixel_values[0].shape == (3, 32, 48)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_channel_mismatch_is_a_clear_error(processor_class):
    # torchvision's normalize would silently broadcast one channel to three.
    with pytest.raises(ValueError, match=r"image_mean has 3 values but an image has 1 channel.*do_convert_rgb=False"):
        processor_class(do_convert_rgb=False)(smooth_image(20, 20, channels=1))
    with pytest.raises(ValueError, match="image_std has 3 values"):
        processor_class(image_mean=[0.5], do_convert_rgb=False)(smooth_image(20, 20, channels=1))


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_masks_are_reproducible_and_match_the_generators(processor_class):
    images = [smooth_image(30, 30, phase=k) for k in range(3)]
    processor = processor_class(size={"height": 64, "width": 96}, patch_size=16, mask_generator="blockwise",
                                mask_generator_kwargs={"reference_grid": [14, 14]})
    out = processor(images, seed=7, return_tensors="pt")
    assert out.bool_masked_pos.shape == (3, 24) and out.bool_masked_pos.dtype == torch.bool
    # The masks are the generator's draws, image by image, from a generator seeded with `seed`.
    generator, rng = build_mask_generator("blockwise", (4, 6), reference_grid=[14, 14]), torch.Generator()
    expected = torch.stack([generator(rng.manual_seed(7) if k == 0 else rng) for k in range(3)])
    assert torch.equal(out.bool_masked_pos, expected)
    with_generator = processor(images, generator=torch.Generator().manual_seed(7)).bool_masked_pos[0]
    assert torch.equal(torch.as_tensor(with_generator), expected[0])
    assert torch.equal(processor(images, seed=7, return_tensors="pt").bool_masked_pos, expected)
    assert not torch.equal(processor(images, seed=8, return_tensors="pt").bool_masked_pos, expected)
    torch.manual_seed(0)  # without seed or generator: torch's global RNG
    first = processor(images, return_tensors="pt").bool_masked_pos
    torch.manual_seed(0)
    assert torch.equal(first, processor(images, return_tensors="pt").bool_masked_pos)


def test_random_masks_and_call_time_settings():
    processor = MimImageProcessor(size={"height": 32, "width": 32}, patch_size=4)
    assert "bool_masked_pos" not in processor(smooth_image(32, 32))
    out = processor([smooth_image(32, 32)] * 4, mask_generator="random", mask_generator_kwargs={"mask_ratio": 0.6},
                    seed=0, return_tensors="pt")
    assert (out.bool_masked_pos.sum(1) == 64 - int(64 * 0.4)).all()
    assert len({tuple(mask.tolist()) for mask in out.bool_masked_pos}) == 4  # each image its own mask
    pil = MimImageProcessorPil(size={"height": 32, "width": 32}, patch_size=4, mask_generator="random",
                               mask_generator_kwargs={"mask_ratio": 0.6})
    assert torch.equal(pil([smooth_image(32, 32)] * 4, seed=0, return_tensors="pt").bool_masked_pos,
                       out.bool_masked_pos)  # same seed, same masks on both backends


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------

SETTINGS = dict(size={"height": 64, "width": 96}, patch_size=[8, 16], do_patchify=True, mask_generator="blockwise",
                mask_generator_kwargs={"reference_grid": [14, 14], "min_aspect": 0.5})


def test_registered_for_every_family():
    for config, *_ in FAMILIES.values():
        assert IMAGE_PROCESSOR_MAPPING[config] == {"torchvision": MimImageProcessor, "pil": MimImageProcessorPil}


def test_save_and_load_round_trip(tmp_path):
    processor = MimImageProcessor(**SETTINGS)
    processor.save_pretrained(tmp_path)
    assert {"preprocessor_config.json", "image_processing_mim.py", "masking.py", "vit_core.py"} <= set(
        os.listdir(tmp_path)
    )
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "MimImageProcessor"
    assert saved["auto_map"]["AutoImageProcessor"] == {
        "torchvision": "image_processing_mim.MimImageProcessor", "pil": "image_processing_mim.MimImageProcessorPil",
    }
    for key in ("size", "patch_size", "do_patchify", "mask_generator", "mask_generator_kwargs"):
        assert saved[key] == SETTINGS[key]
    assert saved["resample"] == 3 and saved["do_center_crop"] is False  # bicubic, no crop
    assert "seed" not in saved and "generator" not in saved

    images = [smooth_image(50, 50)]
    reference = processor(images, seed=3, return_tensors="pt")
    for backend, cls in (("torchvision", MimImageProcessor), ("pil", MimImageProcessorPil)):
        # hf_mim is imported, so its registered classes win even with trust_remote_code=True.
        loaded = AutoImageProcessor.from_pretrained(tmp_path, backend=backend, trust_remote_code=True)
        assert type(loaded) is cls
        assert loaded.to_dict() == processor.to_dict()
        out = loaded(images, seed=3, return_tensors="pt")
        assert torch.equal(out.bool_masked_pos, reference.bool_masked_pos)
        assert (out.pixel_values - reference.pixel_values).abs().max() < 0.04
    assert MimImageProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()


def test_a_processor_saved_with_the_generators_names_loads_and_resaves_with_the_scripts(tmp_path):
    """preprocessor_config.json from before the scripts' spelling (`num_masking_patches`) still loads, draws
    the same masks, and is written back with the one spelling the scripts and cards use."""
    kwargs = {"num_mask_patches": 30, "min_mask_patches_per_block": 5, "max_mask_patches_per_block": 12}
    current = MimImageProcessor(size={"height": 64, "width": 64}, patch_size=8, mask_generator="blockwise",
                                mask_generator_kwargs=kwargs)
    current.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["mask_generator_kwargs"] == kwargs
    config["mask_generator_kwargs"] = {"num_masking_patches": 30, "min_num_patches": 5, "max_num_patches": 12}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    old = AutoImageProcessor.from_pretrained(tmp_path)
    assert old.mask_generator_kwargs == kwargs
    images = [smooth_image(64, 64)] * 3
    assert torch.equal(old(images, seed=5, return_tensors="pt").bool_masked_pos,
                       current(images, seed=5, return_tensors="pt").bool_masked_pos)


@pytest.mark.parametrize("kwargs,option", [
    ({"num_mask_patches": 80}, "num_mask_patches=80"),
    ({"num_masking_patches": 80}, "num_mask_patches=80"),  # the reference's name: the error names the one to pass
    ({"num_mask_patches": 20, "min_mask_patches_per_block": 30}, "min_mask_patches_per_block=30"),
    ({"num_mask_patches": 20, "min_num_patches": 9, "max_num_patches": 4}, "max_mask_patches_per_block=4"),
])
def test_a_mask_count_error_names_the_argument_users_pass(kwargs, option):
    """One spelling: the processor's mask_generator_kwargs, pretrain.py's --num_mask_patches & co. and the errors."""
    with pytest.raises(ValueError, match=option) as error:
        MimImageProcessor(size={"height": 64, "width": 64}, patch_size=8, mask_generator="blockwise",
                          mask_generator_kwargs=kwargs)
    assert "num_masking_patches" not in str(error.value) and "num_patches=" not in str(error.value)


def test_processor_saved_next_to_a_model(tmp_path):
    config = MaeConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                       decoder_num_attention_heads=2, decoder_intermediate_size=64)
    MaeModel(config).save_pretrained(tmp_path)
    MimImageProcessor(size={"height": 32, "width": 32}, patch_size=8).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is MimImageProcessor


REMOTE_LOAD = """
import sys
sys.modules["hf_mim"] = None  # as if hf_mim were not installed
import json, numpy as np, torch
from transformers import AutoImageProcessor
path, image = sys.argv[1], np.load(sys.argv[2])
results = {}
for backend in ("torchvision", "pil"):
    processor = AutoImageProcessor.from_pretrained(path, backend=backend, trust_remote_code=True)
    out = processor([image], seed=3, return_tensors="pt")
    results[backend] = {
        "module": type(processor).__module__, "class": type(processor).__name__,
        "pixel_values": out.pixel_values.flatten()[:50].tolist(), "patches_shape": list(out.patches.shape),
        "bool_masked_pos": out.bool_masked_pos.int().tolist(),
    }
print(json.dumps(results))
"""


def test_loads_as_remote_code_without_hf_mim(tmp_path):
    checkpoint, workdir = tmp_path / "processor", tmp_path / "work"
    workdir.mkdir()
    processor = MimImageProcessor(**SETTINGS)
    processor.save_pretrained(checkpoint)
    image = smooth_image(50, 50)
    np.save(tmp_path / "image.npy", image)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE_LOAD), str(checkpoint), str(tmp_path / "image.npy")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    for backend, cls in (("torchvision", MimImageProcessor), ("pil", MimImageProcessorPil)):
        assert remote[backend]["module"].startswith("transformers_modules.")
        assert remote[backend]["class"] == cls.__name__
        local = cls(**SETTINGS)([image], seed=3, return_tensors="pt")
        assert remote[backend]["patches_shape"] == list(local.patches.shape)
        assert remote[backend]["bool_masked_pos"] == local.bool_masked_pos.int().tolist()
        np.testing.assert_allclose(remote[backend]["pixel_values"], local.pixel_values.flatten()[:50], atol=1e-6)
    assert hf_mim.MimImageProcessor is MimImageProcessor


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(size={"height": 30, "width": 32}), r"30x32 is not divisible by the patch size 16x16"),
        (dict(patch_size=0), "patch_size must be a positive int"),
        (dict(patch_size=[16, 16, 3]), "patch_size must be a positive int"),
        (dict(mask_generator="block"),
         r"Unknown mask generator 'block'; choose one of \['blockwise', 'blockwise_exact', 'random'\]"),
        (dict(mask_generator="random", mask_generator_kwargs={"ratio": 0.5}), r"it accepts \['mask_ratio'\]"),
        (dict(mask_generator="random", mask_generator_kwargs={"mask_ratio": 1.0}), r"must be in \[0, 1\)"),
        (dict(mask_generator="blockwise", size={"height": 64, "width": 96}), r"reference_grid=\(14, 14\)"),
        (dict(seed=0), "call-time argument"),
    ],
)
@pytest.mark.parametrize("processor_class", BACKENDS)
def test_bad_settings_fail_at_construction(processor_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor_class(**kwargs)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_bad_calls_fail_clearly(processor_class):
    processor = processor_class(mask_generator="random")
    with pytest.raises(ValueError, match="either `generator` or `seed`, not both"):
        processor(smooth_image(20, 20), seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"30x40 is not divisible by the patch size 16x16"):
        processor(smooth_image(30, 40), do_resize=False)  # checked on the actual output size
    with pytest.raises(ValueError, match="not divisible"):
        processor(smooth_image(20, 20), size={"height": 40, "width": 40})
