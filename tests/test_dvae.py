"""DALL-E dVAE tokenizer: parity with transformers' FlavaImageCodebook (and with the reference
dall_e package when it is installed), the fp16 mode, the Gumbel-softmax training loss, saving and
remote-code loading, and the ``dalle`` converter."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoModel, FlavaImageCodebook, FlavaImageCodebookConfig
from transformers.models.flava.image_processing_flava import FlavaImageProcessor

from hf_mim import DvaeConfig, DvaeTokenizer
from hf_mim.convert.__main__ import main as convert_main
from hf_mim.models.losses import (
    dvae_loss, gumbel_temperature, kl_to_uniform, kl_weight_at, logit_laplace_nll,
)
from hf_mim.models.modeling_dvae import conv2d_fp16, map_pixels

@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: thread start-up costs more than it gives, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(hidden_size=8, vocab_size=32, decoder_hidden_size=8, decoder_init_size=8)


def tiny_tokenizer(**overrides) -> DvaeTokenizer:
    torch.manual_seed(0)
    return DvaeTokenizer(DvaeConfig(**{**TINY, "reference_fp16": False, **overrides})).eval()


def images(height=16, width=24, batch=2, seed=1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Reference-scale weights and NON-zero biases, so that every bias takes part in the comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


@pytest.fixture
def flava_dir(tmp_path):
    """A saved tiny FlavaImageCodebook with random weights, and the model itself."""
    codebook = FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=8, vocab_size=32)).eval()
    randomize_(codebook)
    codebook.save_pretrained(tmp_path / "flava")
    return tmp_path / "flava", codebook


def convert(*args) -> None:
    assert convert_main(["dalle", *map(str, args)]) == 0


def reference_names(model: DvaeTokenizer, part: str) -> dict[str, torch.Tensor]:
    """Our encoder/decoder weights under the openai/DALL-E names (``blocks...w`` / ``.b``)."""
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith(part + "."):
            key = key[len(part) + 1:].replace(".weight", ".w").replace(".bias", ".b")
            renamed[key] = value.clone()
    return renamed


# ---------------------------------------------------------------------------------------------
# Parity and numerics
# ---------------------------------------------------------------------------------------------


def test_parity_with_flava_image_codebook(flava_dir, tmp_path):
    """FlavaImageCodebook takes pixels ALREADY mapped (its image processor maps them, with
    codebook_do_map_pixels=True); DvaeTokenizer takes [0, 1] pixels and maps them itself."""
    path, codebook = flava_dir
    convert(path, tmp_path / "out", "--config", "reference_fp16=false")
    tokenizer = DvaeTokenizer.from_pretrained(tmp_path / "out").eval()
    assert tokenizer.config.with_decoder is False and tokenizer.decoder is None
    pixels = images(16, 24)
    mapped = FlavaImageProcessor().map_pixels(pixels)  # transformers' own 0.8 * x + 0.1
    with torch.no_grad():
        expected = codebook(mapped)  # [B, 32, 2, 3]
        logits = tokenizer.get_codebook_logits(pixels)
        unmapped = codebook(pixels)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokenizer.get_codebook_indices(pixels), codebook.get_codebook_indices(mapped))
    assert (logits - unmapped).abs().max() > 1e-2  # the map matters: feeding Flava raw pixels is different
    assert tokenizer.get_codebook_indices(pixels).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="--decoder"):
        tokenizer.decode(torch.zeros(1, 2, 2, dtype=torch.long))


def test_fp16_convolution_matches_native_half_arithmetic():
    """The CPU emulation = a native fp16 convolution (fp32 accumulation, one rounding) then an fp16 bias
    add, up to summation order: within one fp16 ulp everywhere, identical almost everywhere."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, 12, generator=generator)
    weight = torch.randn(24, 16, 3, 3, generator=generator) / 12
    bias = torch.randn(24, generator=generator)
    emulated = conv2d_fp16(x, weight, bias, padding=1)
    native = F.conv2d(x.half(), weight.half(), None, padding=1) + bias.half().view(-1, 1, 1)
    assert emulated.dtype == torch.float16
    ulp = torch.finfo(torch.float16).eps * native.float().abs().clamp_min(2**-14)
    assert ((emulated.float() - native.float()).abs() <= ulp).all()
    assert (emulated == native).float().mean() > 0.95
    assert (emulated.float() - F.conv2d(x, weight, bias, padding=1)).abs().max() > 0  # it does round


def flava_state_from(model: DvaeTokenizer) -> dict[str, torch.Tensor]:
    """Our encoder's weights under FlavaImageCodebook's names (its extra .group. and .path. levels)."""
    state = {}
    for key, value in model.encoder.state_dict().items():
        key = re.sub(r"(group_\d+)\.", r"\1.group.", key)
        state[key.replace("res_path.", "res_path.path.")] = value
    return state


def test_reference_fp16_mode_rounds_features_keeps_fp32_logits():
    fp32 = DvaeTokenizer(DvaeConfig(vocab_size=32, hidden_size=8, with_decoder=False, reference_fp16=False)).eval()
    fp16 = DvaeTokenizer(DvaeConfig(vocab_size=32, hidden_size=8, with_decoder=False, reference_fp16=True)).eval()
    randomize_(fp32)
    fp16.load_state_dict(fp32.state_dict())
    dtypes = {}
    fp16.encoder.blocks.group_1.register_forward_hook(lambda m, i, o: dtypes.update(group_1=o.dtype))
    pixels = images(32, 32)
    logits32, logits16 = fp32.get_codebook_logits(pixels), fp16.get_codebook_logits(pixels)
    assert dtypes["group_1"] == torch.float16 and logits16.dtype == torch.float32
    assert 0 < (logits16 - logits32).abs().max() < 2e-2 * logits32.abs().max()
    # The reference on CUDA, independently: FlavaImageCodebook's modules run natively in fp16 (torch's
    # cuDNN path: fp16 convolution without bias, then an fp16 bias add), except the final ReLU + conv,
    # which the reference keeps in fp32.
    half = FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=8, vocab_size=32)).eval()
    half.load_state_dict(flava_state_from(fp32))
    head, half.blocks.output = half.blocks.output, nn.Identity()
    half.half()
    for conv in [m for m in half.modules() if isinstance(m, nn.Conv2d)]:
        bias, conv.bias = conv.bias, None
        conv.register_forward_hook(lambda module, args, out, bias=bias: out + bias.view(-1, 1, 1))
    with torch.no_grad():
        reference = head(half(map_pixels(pixels).half()).float())
    scale = reference.abs().max()
    torch.testing.assert_close(logits16, reference, atol=2e-3 * scale, rtol=0)
    # Same roundings, up to summation order: most logits agree exactly, far closer than fp32 ones do.
    assert (logits16 - reference).abs().mean() < 0.2 * (logits32 - reference).abs().mean()  # measured: 1/25
    assert (logits16 == reference).float().mean() > 0.3  # measured: 0.55


def test_decoder_fp16_mode():
    fp32 = tiny_tokenizer()
    randomize_(fp32)
    fp16 = tiny_tokenizer(reference_fp16=True)
    fp16.load_state_dict(fp32.state_dict())
    dtypes = {}
    fp16.decoder.blocks.group_1.register_forward_hook(lambda m, i, o: dtypes.update(group_1=o.dtype))
    ids = torch.randint(0, 32, (2, 2, 3), generator=torch.Generator().manual_seed(0))
    stats32, stats16 = fp32.decoder.from_indices(ids), fp16.decoder.from_indices(ids)
    assert dtypes["group_1"] == torch.float16 and stats16.dtype == torch.float32
    assert 0 < (stats16 - stats32).abs().max() < 2e-2 * stats32.abs().max()
    assert fp16.decode(ids).dtype == torch.float32


def test_shapes_token_grid_and_input_checks():
    tokenizer = tiny_tokenizer()
    assert tokenizer.vocab_size == 32 and tokenizer.token_grid(112) == (14, 14)
    assert tokenizer.token_grid((16, 40)) == (2, 5)
    pixels = images(16, 40)
    ids = tokenizer.get_codebook_indices(pixels)
    assert ids.dtype == torch.long and ids.shape == (2, 2, 5) and 0 <= ids.min() and ids.max() < 32
    assert tokenizer.decode(ids).shape == (2, 3, 16, 40)
    decoded = tokenizer.decode(ids)
    assert 0 <= decoded.min() and decoded.max() <= 1
    shallow = tiny_tokenizer(num_groups=2)  # 2x downsampling
    assert shallow.token_grid((6, 10)) == (3, 5)
    assert shallow.get_codebook_indices(images(6, 10)).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="multiple of 8"):
        tokenizer.token_grid((20, 16))
    with pytest.raises(ValueError, match="mean/std"):
        tokenizer.get_codebook_indices((images() - 0.45) / 0.22)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tokenizer.get_codebook_indices(images()[:, :1])
    with pytest.raises(ValueError, match="255"):
        tokenizer.get_codebook_indices((images() * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tokenizer.decode(torch.full((1, 2, 2), 32))


def test_decode_lookup_equals_one_hot_convolution():
    tokenizer = tiny_tokenizer()
    randomize_(tokenizer)
    ids = torch.randint(0, 32, (2, 2, 3), generator=torch.Generator().manual_seed(0))
    one_hot = F.one_hot(ids, 32).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        stats = tokenizer.decoder(one_hot)
    torch.testing.assert_close(tokenizer.decode(ids), tokenizer.stats_to_pixels(stats))


def test_reference_init():
    tokenizer = DvaeTokenizer(DvaeConfig(**TINY))
    conv = tokenizer.encoder.blocks.group_4.block_1.res_path.conv_2  # 16 -> 16 channels, 3x3
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(16 * 9), rel=0.15)
    assert torch.count_nonzero(conv.bias) == 0


def test_config_validation():
    with pytest.raises(StrictDataclassError, match="multiple of 4"):
        DvaeConfig(hidden_size=6)
    with pytest.raises(StrictDataclassError, match="reconstruction_loss"):
        DvaeConfig(reconstruction_loss="l1")
    with pytest.raises(StrictDataclassError, match="temperature_end"):
        DvaeConfig(temperature_start=0.5, temperature_end=1.0)


# ---------------------------------------------------------------------------------------------
# Training: loss parts against their formulas, schedules, a few optimizer steps
# ---------------------------------------------------------------------------------------------


def test_kl_to_uniform_of_known_distributions():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().view(1, 4, 1, 1)  # [B, K, h, w]
    expected = sum(p * math.log(p * 4) for p in probs.tolist())  # = 0.25 ln 2
    assert kl_to_uniform(logits).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.25 * math.log(2))
    assert kl_to_uniform(torch.zeros(2, 8, 3, 3)).abs().max() < 1e-6  # uniform: 0
    peaked = torch.tensor([100.0, 0, 0, 0]).view(1, 4, 1, 1)
    assert kl_to_uniform(peaked).item() == pytest.approx(math.log(4), abs=1e-5)  # one-hot: log K


def test_logit_laplace_nll_against_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    x = map_pixels(torch.rand(2, 3, 4, 4, generator=generator))
    loc, log_scale = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    y = torch.log(x) - torch.log1p(-x)
    # density of x = Laplace density of logit(x) times |d logit / dx| = 1 / (x (1 - x))
    expected = -torch.distributions.Laplace(loc, log_scale.exp()).log_prob(y) + torch.log(x * (1 - x))
    torch.testing.assert_close(logit_laplace_nll(x, loc, log_scale), expected, atol=1e-5, rtol=1e-5)
    # and it is a density on (0, 1): integrates to 1
    grid = torch.linspace(1e-6, 1 - 1e-6, 200001)
    density = torch.exp(-logit_laplace_nll(grid.double(), torch.tensor(0.3).double(), torch.tensor(-0.5).double()))
    assert torch.trapezoid(density, grid.double()).item() == pytest.approx(1.0, abs=1e-3)


def test_dvae_loss_combines_parts_per_pixel_value():
    generator = torch.Generator().manual_seed(0)
    target = map_pixels(torch.rand(2, 3, 16, 16, generator=generator))
    stats = torch.randn(2, 6, 16, 16, generator=generator)
    logits = torch.randn(2, 32, 2, 2, generator=generator)
    loss = dvae_loss(stats, target, logits, kl_weight=6.6)
    nll = logit_laplace_nll(target, stats[:, :3], stats[:, 3:])
    kl = kl_to_uniform(logits)
    assert loss.reconstruction.item() == pytest.approx(nll.mean().item(), rel=1e-6)
    assert loss.kl.item() == pytest.approx(kl.mean().item(), rel=1e-6)
    assert loss.total.item() == pytest.approx(((nll.sum() + 6.6 * kl.sum()) / target.numel()).item(), rel=1e-6)
    mse = dvae_loss(stats, target, logits, kl_weight=0.0, reconstruction="mse")
    expected_mse = ((torch.sigmoid(stats[:, :3]) - target) ** 2).mean()
    assert mse.total.item() == pytest.approx(expected_mse.item(), rel=1e-6)
    with pytest.raises(ValueError, match="mse"):
        dvae_loss(stats, target, logits, kl_weight=1.0, reconstruction="l2")


def test_schedules():
    assert gumbel_temperature(0) == 1.0
    assert gumbel_temperature(150_000) == pytest.approx(1 / 16)
    assert gumbel_temperature(10**7) == pytest.approx(1 / 16)
    assert gumbel_temperature(75_000) == pytest.approx((1 + 1 / 16) / 2)
    quarter = 1 / 16 + (1 - 1 / 16) * 0.5 * (1 + math.cos(math.pi / 4))
    assert gumbel_temperature(37_500) == pytest.approx(quarter)
    assert gumbel_temperature(37_500, schedule="linear") == pytest.approx(1 - 0.25 * 15 / 16)
    assert kl_weight_at(0) == 0.0 and kl_weight_at(5000) == pytest.approx(6.6)
    assert kl_weight_at(2500) == pytest.approx(3.3)
    assert kl_weight_at(100, warmup_steps=0) == pytest.approx(6.6)
    with pytest.raises(ValueError, match="cosine"):
        gumbel_temperature(1, schedule="exponential")
    tokenizer = tiny_tokenizer(temperature_anneal_steps=10, kl_warmup_steps=4, kl_weight=2.0)
    assert tokenizer.schedule_values(5) == (pytest.approx((1 + 1 / 16) / 2), pytest.approx(2.0))
    assert tokenizer.schedule_values(None) == (pytest.approx(1 / 16), 2.0)


def test_gumbel_training_reduces_loss():
    tokenizer = tiny_tokenizer(num_groups=2, temperature_anneal_steps=40, kl_warmup_steps=10)  # 2x downsampling
    generator = torch.Generator().manual_seed(3)
    batch = F.interpolate(torch.rand(4, 3, 4, 4, generator=generator), size=8, mode="nearest")  # colour blocks
    with torch.no_grad():
        before = tokenizer(batch, step=60).loss.item()  # eval: argmax codes, deterministic
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=1e-2)
    tokenizer.train()
    for step in range(60):
        output = tokenizer(batch, step=step)
        optimizer.zero_grad()
        output.loss.backward()
        if step == 0:  # the relaxation carries gradients into the encoder
            assert tokenizer.encoder.blocks.input.weight.grad.abs().sum() > 0
        optimizer.step()
    tokenizer.eval()
    with torch.no_grad():
        after = tokenizer(batch, step=60)
    assert after.loss.item() < before - 0.1  # about 0.01 -> -0.15 nats per pixel value
    assert after.reconstruction.shape == batch.shape and after.logits.shape == (4, 32, 4, 4)


def test_straight_through_feeds_hard_codes_with_gradient():
    tokenizer = tiny_tokenizer(straight_through=True).train()
    seen = {}
    tokenizer.decoder.register_forward_pre_hook(lambda m, args: seen.update(codes=args[0]))
    tokenizer(images(16, 16), temperature=0.5).loss.backward()
    codes = seen["codes"]
    assert set(codes.detach().unique().tolist()) == {0.0, 1.0} and torch.all(codes.sum(dim=1) == 1)
    assert tokenizer.encoder.blocks.input.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Saving, Auto classes, remote code
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    tokenizer = tiny_tokenizer(kl_weight=3.0, reconstruction_loss="mse")
    randomize_(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is DvaeTokenizer and loaded.config.kl_weight == 3.0
    assert loaded.config.reconstruction_loss == "mse" and loaded.config.reference_fp16 is False
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pixels = images()
    assert torch.equal(loaded.get_codebook_indices(pixels), tokenizer.get_codebook_indices(pixels))
    # transformers would record a class named "...Tokenizer" as a (slow, fast) text-tokenizer pair
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_dvae.DvaeTokenizer"
    fp16 = DvaeTokenizer.from_pretrained(tmp_path, reference_fp16=True)  # switch the numerics at load time
    assert fp16.encoder.blocks.input.half_precision and not fp16.encoder.blocks.output.conv.half_precision


def test_remote_code_load_without_package(tmp_path):
    tokenizer = tiny_tokenizer()
    randomize_(tokenizer)
    tokenizer.save_pretrained(tmp_path / "saved")
    for name in ("modeling_dvae.py", "configuration_dvae.py", "losses.py", "remote_code.py"):
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
ids = model.get_codebook_indices(torch.load({str(tmp_path / "pixels.pt")!r}))
torch.save({{"ids": ids, "images": model.decode(ids)}}, {str(tmp_path / "result.pt")!r})
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert torch.equal(result["ids"], tokenizer.get_codebook_indices(pixels))
    torch.testing.assert_close(result["images"], tokenizer.decode(result["ids"]))


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------


def test_converter_reference_state_dicts(tmp_path):
    """The openai/DALL-E names (.w/.b): encoder as safetensors, decoder as a plain .pth."""
    from safetensors.torch import save_file

    source = tiny_tokenizer(num_blocks_per_group=1, decoder_num_blocks_per_group=3)
    randomize_(source)
    save_file(reference_names(source, "encoder"), tmp_path / "encoder.safetensors")
    torch.save(reference_names(source, "decoder"), tmp_path / "decoder.pth")
    convert(tmp_path / "encoder.safetensors", tmp_path / "out", "--decoder", tmp_path / "decoder.pth")
    converted = AutoModel.from_pretrained(tmp_path / "out")
    assert converted.config.reference_fp16 is True  # the published numerics by default
    assert converted.config.num_blocks_per_group == 1 and converted.config.decoder_num_blocks_per_group == 3
    for key, value in source.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def fake_dall_e(monkeypatch):
    """A stand-in ``dall_e.encoder`` module, so that a pickle refers to dall_e classes as encoder.pkl does."""
    package, module = types.ModuleType("dall_e"), types.ModuleType("dall_e.encoder")

    class Encoder(nn.Module):
        pass

    Encoder.__module__, Encoder.__qualname__ = "dall_e.encoder", "Encoder"
    module.Encoder, package.encoder = Encoder, module
    monkeypatch.setitem(sys.modules, "dall_e", package)
    monkeypatch.setitem(sys.modules, "dall_e.encoder", module)
    return Encoder


def pickled_module(state_dict: dict, cls: type) -> nn.Module:
    """A module tree whose parameters carry exactly the names of `state_dict`."""
    root = cls()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for name in path:
            if name not in module._modules:
                module.add_module(name, nn.Module())
            module = module._modules[name]
        module.register_parameter(leaf, nn.Parameter(value))
    return root


def test_converter_pickled_encoder(tmp_path, monkeypatch, capsys):
    source = tiny_tokenizer()
    randomize_(source)
    encoder_class = fake_dall_e(monkeypatch)
    torch.save(pickled_module(reference_names(source, "encoder"), encoder_class), tmp_path / "encoder.pkl")
    # Without the flag: a clear refusal naming the flag and the package.
    assert convert_main(["dalle", str(tmp_path / "encoder.pkl"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "--allow-pickle" in error and "pip install DALL-E" in error
    # With the flag, the pickled module converts.
    convert(tmp_path / "encoder.pkl", tmp_path / "out", "--allow-pickle")
    converted = DvaeTokenizer.from_pretrained(tmp_path / "out")
    assert converted.decoder is None
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(converted.encoder.state_dict()[key], value), key
    # Without the dall_e package the unpickling fails with the install hint.
    monkeypatch.setitem(sys.modules, "dall_e", None)
    monkeypatch.delitem(sys.modules, "dall_e.encoder")
    assert convert_main(["dalle", str(tmp_path / "encoder.pkl"), str(tmp_path / "out2"), "--allow-pickle"]) == 2
    error = capsys.readouterr().err
    assert "'dall_e.encoder'" in error and "pip install DALL-E" in error


def test_converter_errors(tmp_path, flava_dir, capsys):
    from safetensors.torch import save_file

    source = tiny_tokenizer()
    save_file(reference_names(source, "encoder"), tmp_path / "encoder.safetensors")
    save_file(reference_names(source, "decoder"), tmp_path / "decoder.safetensors")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    flava, _ = flava_dir
    enc, dec, out = str(tmp_path / "encoder.safetensors"), str(tmp_path / "decoder.safetensors"), str(tmp_path / "o")
    cases = [
        ([dec, out], "looks like a DALL-E decoder"),
        ([enc, out, "--decoder", enc], "looks like a DALL-E encoder"),
        ([str(tmp_path / "bert"), out], "'flava_image_codebook'"),
        ([str(flava), out, "--config", "hidden_size=16"], "hidden_size=16"),
        ([str(flava), out, "--config", "with_decoder=true"], "--decoder"),
        ([str(flava), out, "--config", "widht=3"], "not DvaeConfig fields"),
        ([str(tmp_path / "missing.pkl"), out], "No checkpoint"),
    ]
    for args, message in cases:
        assert convert_main(["dalle", *args]) == 2, args
        assert message in capsys.readouterr().err, (args, message)


def test_converter_against_reference_dall_e_package(tmp_path):
    """Parity with the real openai/DALL-E modules (pip install DALL-E); skipped where it is missing."""
    pytest.importorskip("dall_e")
    from dall_e import Decoder, Encoder

    torch.manual_seed(0)
    encoder = Encoder(n_hid=64, vocab_size=512)  # its validators: n_hid >= 64, vocab >= 512
    decoder = Decoder(n_init=16, n_hid=64, vocab_size=512)
    with torch.no_grad():  # reference init has zero biases: give them values so that they are compared
        for name, param in [*encoder.named_parameters(), *decoder.named_parameters()]:
            if name.endswith(".b"):
                param.normal_(std=0.1)
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    convert(tmp_path / "encoder.pkl", tmp_path / "out", "--decoder", tmp_path / "decoder.pkl", "--allow-pickle",
            "--config", "reference_fp16=false")
    tokenizer = DvaeTokenizer.from_pretrained(tmp_path / "out").eval()
    pixels = images(16, 16)
    with torch.no_grad():
        expected = encoder(map_pixels(pixels))  # on CPU the reference computes in fp32
        torch.testing.assert_close(tokenizer.get_codebook_logits(pixels), expected, atol=1e-4, rtol=1e-4)
        ids = expected.argmax(dim=1)
        stats = decoder(F.one_hot(ids, 512).permute(0, 3, 1, 2).float()).float()
        torch.testing.assert_close(tokenizer.decoder.from_indices(ids), stats, atol=1e-4, rtol=1e-4)
