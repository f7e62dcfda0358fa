"""ViT masked patch prediction: the 80/10/10 corruption, the mean-colour targets, the loss, save/load,
remote code, and a small learning check on sklearn's digits."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from hf_mim import VitMppConfig, VitMppForImageClassification, VitMppForPreTraining, VitMppModel
from hf_mim.models.losses import masked_token_loss, mean_color_targets
from hf_mim.models.masking import (
    KEPT_UNCHANGED, NOT_CORRUPTED, REPLACED_BY_MASK, REPLACED_BY_OTHER_PATCH, RandomMaskGenerator,
    corrupt_patch_embeddings, random_patch_selection,
)
from hf_mim.models.vit_core import resize_pos_embed
from model_testing import randomize

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)
GRID = 16  # 4x4 patches


def tiny_config(**changes) -> VitMppConfig:
    return VitMppConfig(**{**TINY, **changes})


def batch(seed: int = 0, size: int = 3):
    """Normalised model input, the [0, 1] images it came from, their labels, and a 50% mask."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, 32, 32, generator=generator)
    mask = random_patch_selection(size, GRID, 0.5, generator)
    return (images - 0.5) / 0.25, images, mean_color_targets(images, 8), mask


# ---------------------------------------------------------------------------------------------
# The corruption (a pure function)
# ---------------------------------------------------------------------------------------------


def draw(tokens, mask, seed=0, **probs):
    mask_token = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(99))
    return mask_token, corrupt_patch_embeddings(tokens, mask_token, mask, torch.Generator().manual_seed(seed), **probs)


def test_branch_fractions_are_80_10_10_of_the_selected_patches():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(32, 49, 8, generator=generator)
    counts, selected = torch.zeros(4), 0
    for seed in range(30):
        mask = random_patch_selection(32, 49, 0.5, generator)
        assert torch.all(mask.sum(1) == 49 - int(49 * 0.5))  # random_masking's count rule: 25 of 49
        _, result = draw(tokens, mask, seed=seed)
        assert torch.all((result.branch == NOT_CORRUPTED) == ~mask)  # exactly the selected ones are corrupted
        counts += torch.bincount(result.branch.flatten(), minlength=4).float()
        selected += int(mask.sum())
    for branch, p in ((REPLACED_BY_MASK, 0.8), (REPLACED_BY_OTHER_PATCH, 0.1), (KEPT_UNCHANGED, 0.1)):
        sigma = math.sqrt(p * (1 - p) / selected)  # binomial standard error, n = 24,000
        assert abs(counts[branch] / selected - p) < 4 * sigma, (branch, counts[branch] / selected)


def test_tokens_of_each_branch():
    tokens = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(2)) < 0.7
    mask_token, result = draw(tokens, mask, replace_prob=0.4, random_prob=0.3)
    branch, source = result.branch, result.source
    assert {int(b) for b in branch[mask].unique()} == {REPLACED_BY_MASK, REPLACED_BY_OTHER_PATCH, KEPT_UNCHANGED}
    for b in range(4):
        for i in range(9):
            got = result.tokens[b, i]
            if branch[b, i] == REPLACED_BY_MASK:
                assert torch.equal(got, mask_token) and source[b, i] == -1
            elif branch[b, i] == REPLACED_BY_OTHER_PATCH:
                j = int(source[b, i])
                assert j != i and torch.equal(got, tokens[b, j])  # the ORIGINAL embedding of another patch, same image
            else:
                assert torch.equal(got, tokens[b, i]) and source[b, i] == i
    # The copied embedding is the original one even when its patch is itself masked.
    moved = branch == REPLACED_BY_OTHER_PATCH
    sources = result.source[moved]
    rows = moved.nonzero()[:, 0]
    assert (branch[rows, sources] == REPLACED_BY_MASK).any()


def test_random_other_is_uniform_over_the_other_positions_and_never_itself():
    tokens = torch.randn(200, 4, 3)
    mask = torch.ones(200, 4, dtype=torch.bool)
    offsets = torch.zeros(4, dtype=torch.long)
    for seed in range(10):
        _, result = draw(tokens, mask, seed=seed, replace_prob=0.0, random_prob=1.0)
        assert torch.all(result.branch == REPLACED_BY_OTHER_PATCH)
        assert torch.all(result.source != torch.arange(4))
        offsets += torch.bincount(((result.source - torch.arange(4)) % 4).flatten(), minlength=4)
    assert offsets[0] == 0
    expected, sigma = 8000 / 3, math.sqrt(8000 * (1 / 3) * (2 / 3))
    assert torch.all((offsets[1:] - expected).abs() < 4 * sigma), offsets


def test_gradients_reach_the_mask_token_and_every_source():
    tokens = torch.randn(3, 8, 5, requires_grad=True)
    mask_token = torch.randn(5, requires_grad=True)
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(3)) < 0.8
    result = corrupt_patch_embeddings(tokens, mask_token, mask, torch.Generator().manual_seed(4), 0.5, 0.3)
    weights = torch.randn(3, 8, 5)
    (result.tokens * weights).sum().backward()
    is_mask = result.branch == REPLACED_BY_MASK
    assert is_mask.any() and (result.branch == REPLACED_BY_OTHER_PATCH).any()
    assert torch.allclose(mask_token.grad, weights[is_mask].sum(0), atol=1e-6)
    expected = torch.zeros(3, 8, 5)
    for b in range(3):
        for i in range(8):
            if not is_mask[b, i]:
                expected[b, result.source[b, i]] += weights[b, i]
    assert torch.allclose(tokens.grad, expected, atol=1e-6)


def test_corruption_is_reproducible_and_checks_its_inputs():
    tokens, mask = torch.randn(2, 9, 4), torch.ones(2, 9, dtype=torch.bool)
    first, second = draw(tokens, mask, seed=5)[1], draw(tokens, mask, seed=5)[1]
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.branch, second.branch)
    assert not torch.equal(first.branch, draw(tokens, mask, seed=6)[1].branch)
    with pytest.raises(ValueError, match=r"bool tensor \[2, 9\]"):
        corrupt_patch_embeddings(tokens, torch.zeros(4), mask.float())
    with pytest.raises(ValueError, match="summing to at most 1"):
        corrupt_patch_embeddings(tokens, torch.zeros(4), mask, replace_prob=0.8, random_prob=0.3)
    with pytest.raises(ValueError, match="embedding width 4"):
        corrupt_patch_embeddings(tokens, torch.zeros(5), mask)
    with pytest.raises(ValueError, match="at least 2 patches"):
        corrupt_patch_embeddings(torch.randn(2, 1, 4), torch.zeros(4), torch.ones(2, 1, dtype=torch.bool),
                                 replace_prob=0.0, random_prob=1.0)


def test_selection_count_matches_the_random_mask_generator():
    for ratio in (0.5, 0.3, 0.75):
        generator = RandomMaskGenerator((5, 5), ratio)
        drawn = random_patch_selection(4, 25, ratio, torch.Generator().manual_seed(0))
        assert torch.all(drawn.sum(1) == generator.num_mask_patches)


# ---------------------------------------------------------------------------------------------
# Mean-colour targets
# ---------------------------------------------------------------------------------------------


def loop_targets(images: torch.Tensor, ph: int, pw: int, bits: int) -> torch.Tensor:
    levels = 2**bits
    batch, channels, height, width = images.shape
    out = torch.zeros(batch, (height // ph) * (width // pw), dtype=torch.long)
    for b in range(batch):
        for r in range(height // ph):
            for c in range(width // pw):
                value = 0
                for ch in range(channels):
                    mean = images[b, ch, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw].double().mean().item()
                    value = value * levels + min(math.floor(mean * levels), levels - 1)
                out[b, r * (width // pw) + c] = value
    return out


@pytest.mark.parametrize("channels, patch, bits", [(3, 4, 3), (1, 4, 3), (3, (2, 4), 2), (2, 8, 3)])
def test_mean_color_targets_match_a_loop(channels, patch, bits):
    images = torch.rand(2, channels, 16, 16, generator=torch.Generator().manual_seed(channels))
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    images[0, :, :ph, :pw] = 1.0  # the top edge: level 2**bits - 1, not 2**bits
    images[1, :, :ph, :pw] = 0.0
    images[0, :, ph:2 * ph, :pw] = 0.5  # exactly on a level boundary: the upper level
    expected = loop_targets(images, ph, pw, bits)
    got = mean_color_targets(images, patch, bits)
    assert got.dtype == torch.long and torch.equal(got, expected)
    assert got.max() < (2**bits) ** channels
    levels = 2**bits
    top = sum((levels - 1) * levels**k for k in range(channels))
    assert got[0, 0] == top and got[1, 0] == 0
    assert got[0, (16 // pw)] == sum((levels // 2) * levels**k for k in range(channels))


def test_mean_color_classes_of_named_colors():
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.55, 0.124]])
    images = colors[:, :, None, None].expand(-1, -1, 4, 4)  # one flat 4x4 patch per colour
    # r*64 + g*8 + b with level = min(floor(mean * 8), 7): 0.3 -> 2, 0.55 -> 4, 0.124 -> 0.
    assert mean_color_targets(images, 4).flatten().tolist() == [7 * 64, 7 * 8, 7, 2 * 64 + 4 * 8 + 0]
    gray = torch.linspace(0, 1, 9)[:, None, None, None].expand(-1, 1, 2, 2)  # one channel: 8 classes
    assert mean_color_targets(gray, 2).flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7]


def test_mean_color_targets_reject_normalised_or_integer_pixels():
    with pytest.raises(ValueError, match="unnormalised pixels in \\[0, 1\\]"):
        mean_color_targets(torch.randn(1, 3, 8, 8) * 2, 4)
    with pytest.raises(ValueError, match="/ 255"):
        mean_color_targets(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="not divisible"):
        mean_color_targets(torch.rand(1, 3, 10, 8), 4)
    model = VitMppForPreTraining(tiny_config())
    with pytest.raises(ValueError, match="3 channels"):
        model.compute_labels(torch.rand(1, 1, 32, 32))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def test_loss_and_accuracy_over_corrupted_patches_only():
    model = randomize(VitMppForPreTraining(tiny_config()))
    pixels, images, labels, mask = batch()
    assert torch.equal(model.compute_labels(images), labels)
    out = model(pixels, mask, labels, generator=torch.Generator().manual_seed(0))
    targets = labels[mask]  # row-major: sample by sample, patch order inside
    assert out.logits.shape == (int(mask.sum()), 512)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, targets), atol=1e-6)
    assert out.accuracy == pytest.approx((out.logits.argmax(-1) == targets).float().mean().item())
    assert torch.equal(out.bool_masked_pos, mask)
    assert torch.all((out.corruption_branch != NOT_CORRUPTED) == mask)
    with torch.no_grad():
        encoded = model.vit(pixels, mask, generator=torch.Generator().manual_seed(0)).last_hidden_state
    assert torch.allclose(out.logits, model.mpp_head(encoded[:, 1:][mask]), atol=1e-6)
    other = labels.clone()
    other[~mask] = (other[~mask] + 1) % 512
    same = model(pixels, mask, other, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same.loss, out.loss)
    assert model(pixels, mask, generator=torch.Generator().manual_seed(0)).loss is None


def test_compiles_with_one_graph_break_for_the_corrupted_count():
    """The corrupted count is read once after the encoder: the only graph break; compiled equals eager
    (the corruption's random draws come from the same generator seed)."""
    model = randomize(VitMppForPreTraining(tiny_config()))
    pixels, _, labels, mask = batch()
    explanation = torch._dynamo.explain(model)(pixels, mask, labels)
    assert explanation.graph_break_count == 1, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")(pixels, mask, labels, generator=torch.Generator().manual_seed(1))
    eager = model(pixels, mask, labels, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(compiled.logits, eager.logits)
    torch.testing.assert_close(compiled.loss, eager.loss)


def test_varying_counts_grid_masks_and_an_empty_mask():
    model = randomize(VitMppForPreTraining(tiny_config()))
    pixels, _, labels, _ = batch()
    mask = torch.zeros(3, GRID, dtype=torch.bool)
    mask[0, :1], mask[1, 3:10], mask[2, :] = True, True, True
    out = model(pixels, mask.reshape(3, 4, 4).int(), labels.reshape(3, 4, 4))
    assert out.logits.shape == (1 + 7 + 16, 512)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels[mask]), atol=1e-6)
    model.train()
    empty = model(pixels, torch.zeros(3, GRID, dtype=torch.bool), labels)
    assert empty.logits.shape == (0, 512) and empty.loss.item() == 0.0 and empty.accuracy.item() == 0.0
    empty.loss.backward()  # the graph is intact, no NaN
    assert torch.count_nonzero(model.mpp_head.weight.grad) == 0


def test_drawn_mask_is_half_the_patches_and_follows_the_generator():
    model = randomize(VitMppForPreTraining(tiny_config()))
    pixels, _, labels, _ = batch()
    first = model(pixels, labels=labels, generator=torch.Generator().manual_seed(7))
    second = model(pixels, labels=labels, generator=torch.Generator().manual_seed(7))
    assert torch.all(first.bool_masked_pos.sum(1) == GRID // 2)
    assert torch.equal(first.bool_masked_pos, second.bool_masked_pos) and torch.equal(first.logits, second.logits)
    assert not torch.equal(first.bool_masked_pos, model(pixels, generator=torch.Generator().manual_seed(8)).bool_masked_pos)


def test_corruption_happens_before_the_position_embeddings():
    pixels, _, _, mask = batch()
    masked_only = randomize(VitMppForPreTraining(tiny_config(replace_prob=1.0, random_prob=0.0)))
    changed = pixels.clone()
    first = int(mask[0].nonzero()[0])
    row, col = divmod(first, 4)
    changed[0, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 3.0  # a masked patch's pixels do not matter
    with torch.no_grad():
        assert torch.equal(masked_only(pixels, mask).logits, masked_only(changed, mask).logits)
        # Mask-token rows differ only by position: the position table is added after the swap.
        embeddings = masked_only.vit(pixels, mask, output_hidden_states=True).hidden_states[0][:, 1:]
        pos = masked_only.vit.pos_embed[0, 1:]
        assert torch.allclose(embeddings[mask], (masked_only.vit.mask_token[0] + pos.expand(3, -1, -1)[mask]))
    # A moved patch brings its content, not its position: it gets the position of the patch it replaces.
    moved_only = randomize(VitMppForPreTraining(tiny_config(replace_prob=0.0, random_prob=1.0)))
    with torch.no_grad():
        out = moved_only.vit(pixels, mask, generator=torch.Generator().manual_seed(2), output_hidden_states=True)
        content = moved_only.vit.patch_embed(pixels)  # [B, N, D]
        pos = moved_only.vit.pos_embed[0, 1:]  # [N, D]
    assert torch.all(out.corruption_branch[mask] == REPLACED_BY_OTHER_PATCH)
    generator = torch.Generator().manual_seed(2)  # the same draws, from the pure function
    source = corrupt_patch_embeddings(content, moved_only.vit.mask_token, mask, generator, 0.0, 1.0).source
    expected = torch.gather(content, 1, source[..., None].expand_as(content)) + pos
    assert torch.allclose(out.hidden_states[0][:, 1:], expected, atol=1e-6)
    assert not torch.equal(source[mask], torch.arange(GRID).expand(3, -1)[mask])
    unchanged = randomize(VitMppForPreTraining(tiny_config(replace_prob=0.0, random_prob=0.0)))
    with torch.no_grad():
        plain = unchanged.vit(pixels).last_hidden_state[:, 1:][mask]
        assert torch.equal(unchanged(pixels, mask).logits, unchanged.mpp_head(plain))


def test_timm_style_init():
    config = tiny_config(hidden_size=96, intermediate_size=384, num_attention_heads=4)
    model = VitMppForPreTraining(config)
    for name in ("vit.patch_embed.proj.weight", "vit.blocks.0.attn.qkv.weight", "vit.blocks.1.mlp.fc2.weight",
                 "mpp_head.weight", "vit.pos_embed", "vit.cls_token", "vit.mask_token"):
        weight = model.get_parameter(name)
        if weight.numel() > 1000:
            assert weight.std().item() == pytest.approx(0.02, rel=0.08), name
        assert 0 < weight.abs().max() < 0.02 * 6, name
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        elif "norm" in name:
            assert torch.all(param == 1), name


def test_config_errors_name_the_fix():
    assert VitMppConfig().num_color_classes == 512 and tiny_config(num_channels=1).num_color_classes == 8
    for changes, message in [
        (dict(mask_ratio=1.0), "ViT uses 0.5"),
        (dict(replace_prob=0.95, random_prob=0.1), "ViT uses 0.8 and 0.1"),
        (dict(color_bits=0), "ViT uses 3"),
        (dict(image_size=30), "not divisible by the patch size"),
        (dict(num_attention_heads=5), "not divisible by num_attention_heads"),
    ]:
        with pytest.raises((ValueError, StrictDataclassError), match=message):
            tiny_config(**changes)


# ---------------------------------------------------------------------------------------------
# Save / load, Auto classes, classification, other grids
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = randomize(VitMppForPreTraining(tiny_config()))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(loaded) is VitMppForPreTraining
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    pixels, _, labels, mask = batch()
    with torch.no_grad():
        expected = model(pixels, mask, labels, generator=torch.Generator().manual_seed(1))
        got = loaded(pixels, mask, labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(expected.logits, got.logits) and torch.equal(expected.loss, got.loss)
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder) is VitMppModel
    with torch.no_grad():
        assert torch.equal(encoder(pixels).last_hidden_state, model.vit(pixels).last_hidden_state)
    classifier, info = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=5, output_loading_info=True)
    assert type(classifier) is VitMppForImageClassification and classifier.vit.mask_token is None
    assert set(info["missing_keys"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert torch.equal(classifier.vit.blocks[1].mlp.fc1.weight, model.vit.blocks[1].mlp.fc1.weight)


def test_classification_heads_and_other_grids():
    for pooling in (True, False):
        model = randomize(VitMppForImageClassification(tiny_config(num_labels=7, use_mean_pooling=pooling)))
        assert (model.fc_norm is not None) == pooling and (model.vit.norm is None) == pooling
        out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 6]))
        assert out.logits.shape == (2, 7) and torch.isfinite(out.loss)
    # A 6x6 grid on a model built for 4x4 equals a 6x6 model holding the bicubically resized table.
    model = randomize(VitMppModel(tiny_config()))
    bigger = VitMppModel(tiny_config(image_size=48)).eval()
    state = model.state_dict()
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], (4, 4), (6, 6))
    bigger.load_state_dict(state)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(pixels).last_hidden_state, bigger(pixels).last_hidden_state, atol=1e-5)
    with pytest.raises(ValueError, match="without a mask token"):
        VitMppForImageClassification(tiny_config(num_labels=2)).vit(pixels, torch.ones(2, 36, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Remote code: the saved directory works where hf_mim is not installed
# ---------------------------------------------------------------------------------------------

REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["hf_mim"] = None  # the package must not be importable
    import torch
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    path, io = sys.argv[1], torch.load(sys.argv[2])
    model = AutoModelForPreTraining.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model).__name__ == "VitMppForPreTraining"
    with torch.no_grad():
        out = model(io["pixels"], io["mask"], io["labels"], generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.logits, io["logits"], atol=1e-6) and torch.allclose(out.loss, io["loss"], atol=1e-6)
    assert torch.equal(model.compute_labels(io["images"]), io["labels"])
    assert type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__ == "VitMppModel"
    classifier = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True, num_labels=3)
    assert torch.equal(classifier.vit.blocks[0].attn.qkv.weight, model.vit.blocks[0].attn.qkv.weight)
    assert not any(name.startswith("hf_mim") for name in sys.modules if sys.modules[name] is not None)
    print("REMOTE-OK")
""")


def test_remote_code_load_without_hf_mim(tmp_path):
    model = randomize(VitMppForPreTraining(tiny_config()))
    model.save_pretrained(tmp_path / "checkpoint")
    assert {"modeling_vit_mpp.py", "configuration_vit_mpp.py", "masking.py", "losses.py", "vit_core.py"} <= {
        p.name for p in (tmp_path / "checkpoint").glob("*.py")
    }
    pixels, images, labels, mask = batch()
    with torch.no_grad():
        out = model(pixels, mask, labels, generator=torch.Generator().manual_seed(3))
    torch.save({"pixels": pixels, "images": images, "mask": mask, "labels": labels, "logits": out.logits,
                "loss": out.loss}, tmp_path / "io.pt")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "checkpoint"), str(tmp_path / "io.pt")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK" in result.stdout


# ---------------------------------------------------------------------------------------------
# Learning: on digits, the corrupted patches' mean colours are predicted from their context
# ---------------------------------------------------------------------------------------------


def test_learns_mean_colours_from_context_on_digits():
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and the machine is shared
    try:
        torch.manual_seed(0)
        images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
        images = F.interpolate(images, size=16, mode="bilinear", align_corners=False).clamp(0, 1)  # 4x4 patches of 4 px
        config = VitMppConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              image_size=16, patch_size=4, num_channels=1)
        model = VitMppForPreTraining(config)
        labels = model.compute_labels(images)  # [1797, 16], 8 classes
        pixels = (images - 0.5) / 0.5
        train, test = slice(0, 1500), slice(1500, None)
        generator = torch.Generator().manual_seed(1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        for _ in range(400):
            index = torch.randint(0, 1500, (64,), generator=generator)
            loss = model(pixels[train][index], labels=labels[train][index], generator=generator).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            out = model(pixels[test], labels=labels[test], generator=torch.Generator().manual_seed(5))
    finally:
        torch.set_num_threads(threads)
    targets = labels[test][out.bool_masked_pos]  # [M]
    train_labels = labels[train]
    majority = (targets == torch.bincount(train_labels.flatten()).argmax()).float().mean()
    # A stronger baseline: the most frequent class at each patch position.
    per_position = torch.stack([torch.bincount(train_labels[:, j]).argmax() for j in range(16)])
    position_baseline = (per_position.expand(297, -1)[out.bool_masked_pos] == targets).float().mean()
    # Patches replaced by the mask token carry no content: only the context can tell their colour.
    masked = out.corruption_branch[out.bool_masked_pos] == REPLACED_BY_MASK
    masked_accuracy = (out.logits.argmax(-1)[masked] == targets[masked]).float().mean()
    assert out.accuracy > majority + 0.15, (out.accuracy, majority)
    assert masked_accuracy > position_baseline + 0.08, (masked_accuracy, position_baseline)
    assert masked_token_loss(out.logits, targets)[1] == out.accuracy


def test_per_sample_losses_tuples_and_unknown_keywords():
    model = randomize(VitMppForPreTraining(tiny_config())).eval()
    pixels = torch.rand(2, 3, 32, 32)
    labels = model.compute_labels(pixels)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :3], mask[1, 5:15] = True, True
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(pixels, bool_masked_pos=mask, labels=labels, generator=generator)
        as_tuple = model(pixels, bool_masked_pos=mask, labels=labels, generator=torch.Generator().manual_seed(0),
                         return_dict=False)
    ce = torch.nn.functional.cross_entropy(out.logits, labels[mask], reduction="none")  # [M]
    per_image = torch.zeros(2).index_add(0, mask.nonzero()[:, 0], ce) / mask.sum(-1)
    torch.testing.assert_close(out.per_sample_loss, per_image)
    torch.testing.assert_close(out.loss, ce.mean())
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss)
    with pytest.raises(TypeError, match="unexpected keyword argument 'noise'"):
        model(pixels, noise=torch.rand(2, 16))
