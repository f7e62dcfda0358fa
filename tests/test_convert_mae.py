"""`python -m hf_mim.convert mae`: transformers ViTMAE directories and reference MAE `.pth` files
become hf_mim MaeForPreTraining / MaeModel / MaeForImageClassification directories that compute the
same outputs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from mae_testing import perturb_parameters_, reference_sincos_table, tiny_mae_config
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining, ViTConfig, ViTMAEConfig,
    ViTMAEForPreTraining, ViTMAEModel,
)
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

from hf_mim import MaeForImageClassification, MaeForPreTraining, MaeModel
from hf_mim.convert import mae
from hf_mim.convert.__main__ import main

TINY_HEADS = ("num_attention_heads=4", "decoder_num_attention_heads=2")  # the weights cannot tell heads
REPO_SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_convert(src, out, *config: str):
    """The converter in-process, with the arguments the CLI parser would give it."""
    return mae.convert(argparse.Namespace(src=str(src), out=str(out), config=list(config), allow_pickle=False))


def no_table_warnings(record) -> bool:
    return not any("sin-cos" in str(w.message) for w in record)


# ---------------------------------------------------------------------------------------------
# transformers ViTMAE -> hf_mim
# ---------------------------------------------------------------------------------------------


def transformers_config(norm_pix_loss: bool) -> ViTMAEConfig:
    return ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=24, layer_norm_eps=1e-6, norm_pix_loss=norm_pix_loss, mask_ratio=0.75,
    )


def swapped_halves_table(grid: int, dim: int) -> torch.Tensor:
    """transformers' own MAE table: its builder's [h | w] halves swapped to the checkpoint layout."""
    table = build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=dim, cls_token=True)
    return torch.cat([table[:, dim // 2:], table[:, :dim // 2]], dim=1).unsqueeze(0)


@torch.no_grad()
def random_transformers_mae(norm_pix_loss: bool, with_tables: bool = True) -> ViTMAEForPreTraining:
    torch.manual_seed(0)
    model = perturb_parameters_(ViTMAEForPreTraining(transformers_config(norm_pix_loss)))
    if with_tables:  # built from a config, transformers leaves both tables (and the mask token) at zero
        model.vit.embeddings.position_embeddings.copy_(swapped_halves_table(4, 32))
        model.decoder.decoder_pos_embed.copy_(swapped_halves_table(4, 16))
    return model.eval()


def save_transformers_dir(model, path: Path, layout: str) -> Path:
    """The layouts a ViTMAE directory can have on disk."""
    if layout == "save_pretrained":  # transformers 5.23: old names, decoder as `decoder_encoder.layer.N`
        model.save_pretrained(path)
        return path
    if layout == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").exists()
        return path
    model.config.save_pretrained(path)
    if layout == "in_memory_names":  # q_proj/k_proj/v_proj/o_proj, mlp.fc1, layers.N, decoder_layers.N
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    elif layout == "transformers4_bin":  # attention.attention.query ..., decoder_layers.N, pytorch_model.bin
        model.save_pretrained(path / "tmp")
        state_dict = load_file(path / "tmp" / "model.safetensors")
        state_dict = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
                      for k, v in state_dict.items()}
        assert any("decoder_layers.1.attention.attention.query" in k for k in state_dict)
        torch.save(state_dict, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("layout", ["save_pretrained", "sharded", "in_memory_names", "transformers4_bin"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_transformers_pretraining_dir_parity(tmp_path, layout, norm_pix_loss):
    reference = random_transformers_mae(norm_pix_loss)
    src = save_transformers_dir(reference, tmp_path / "src", layout)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_convert(src, tmp_path / "out")
    assert no_table_warnings(record)
    model = AutoModelForPreTraining.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, MaeForPreTraining)
    assert model.config.norm_pix_loss is norm_pix_loss and model.config.layer_norm_eps == 1e-6

    torch.manual_seed(1)
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        expected, ours = reference(pixel_values=pixels, noise=noise), model(pixels, noise=noise)
        expected_latent = reference.vit(pixel_values=pixels, noise=noise).last_hidden_state
        latent = model.encoder(pixels, noise=noise).last_hidden_state
    torch.testing.assert_close(ours.logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, expected.loss, atol=1e-4, rtol=0)
    torch.testing.assert_close(latent, expected_latent, atol=1e-4, rtol=0)
    assert torch.equal(ours.mask, expected.mask) and torch.equal(ours.ids_restore, expected.ids_restore)


def test_transformers_encoder_dir_parity(tmp_path):
    torch.manual_seed(0)
    reference = perturb_parameters_(ViTMAEModel(transformers_config(norm_pix_loss=False))).eval()
    with torch.no_grad():
        reference.embeddings.position_embeddings.copy_(swapped_halves_table(4, 32))
    reference.save_pretrained(tmp_path / "src")
    run_convert(tmp_path / "src", tmp_path / "out")
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(model) is MaeModel
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, noise=noise).last_hidden_state
        torch.testing.assert_close(model(pixels, noise=noise).last_hidden_state, expected, atol=1e-4, rtol=0)
        # The attention maps MAE users draw: transformers' own, block by block (its eager kernel forms them).
        reference.set_attn_implementation("eager")
        expected_maps = reference(pixel_values=pixels, noise=noise, output_attentions=True).attentions
        maps = model(pixels, noise=noise, output_attentions=True).attentions
    assert len(maps) == len(expected_maps) == 2 and maps[0].shape == (2, 4, 5, 5)  # CLS + 4 kept of 16
    for ours, theirs in zip(maps, expected_maps):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_untrained_transformers_tables_warn(tmp_path):
    random_transformers_mae(False, with_tables=False).save_pretrained(tmp_path / "src")
    with pytest.warns(UserWarning, match="pos_embed differs from the standard 2-D sin-cos table"):
        run_convert(tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Reference (facebookresearch/mae) checkpoints -> hf_mim
# ---------------------------------------------------------------------------------------------

# hf_mim name prefix -> reference (timm) name prefix, written independently of the converter.
OURS_TO_REFERENCE = [
    ("encoder.", ""),
    ("decoder.embed.", "decoder_embed."),
    ("decoder.mask_token", "mask_token"),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.pred.", "decoder_pred."),
]


def reference_checkpoint(model, path: Path, encoder_only: bool = False) -> Path:
    """Write `model` as the reference code saves it: {'model': state_dict}, timm names, fixed tables."""
    state_dict = {}
    for key, value in model.state_dict().items():
        prefix, new = next((p, n) for p, n in OURS_TO_REFERENCE if key.startswith(p))
        if not (encoder_only and prefix.startswith("decoder")):
            state_dict[new + key[len(prefix):]] = value.clone()
    rows, cols = model.encoder.grid_size
    state_dict["pos_embed"] = torch.from_numpy(reference_sincos_table(rows, cols, 32)).float()[None]
    if not encoder_only:
        state_dict["decoder_pos_embed"] = torch.from_numpy(reference_sincos_table(rows, cols, 16)).float()[None]
    torch.save({"model": state_dict}, path)
    return path


def random_mae(**overrides) -> MaeForPreTraining:
    torch.manual_seed(0)
    return perturb_parameters_(MaeForPreTraining(tiny_mae_config(**overrides))).eval()


def test_reference_checkpoint_round_trip(tmp_path):
    original = random_mae(mask_ratio=0.5)
    src = reference_checkpoint(original, tmp_path / "mae_visualize_tiny.pth")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_convert(src, tmp_path / "out", *TINY_HEADS, "mask_ratio=0.5")
    assert no_table_warnings(record)
    model = AutoModelForPreTraining.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, MaeForPreTraining)
    # A file with a decoder defaults to raw-pixel targets (the published mae_visualize_* files).
    assert model.config.norm_pix_loss is False and model.config.layer_norm_eps == 1e-6
    assert model.config.image_size == 32 and model.config.patch_size == 8
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        expected, ours = original(pixels, noise=noise), model(pixels, noise=noise)
    assert torch.equal(ours.logits, expected.logits) and torch.equal(ours.loss, expected.loss)
    assert torch.equal(ours.mask, expected.mask)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert (processor.size["height"], processor.size["width"]) == (32, 32)


def test_encoder_only_checkpoint_becomes_mae_model(tmp_path):
    original = random_mae()
    src = reference_checkpoint(original, tmp_path / "mae_pretrain_tiny.pth", encoder_only=True)
    run_convert(src, tmp_path / "out", "num_attention_heads=4")
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(model) is MaeModel
    assert model.config.norm_pix_loss is True  # how the published mae_pretrain_* encoders were trained
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixels).last_hidden_state, original.encoder(pixels).last_hidden_state)


@pytest.mark.parametrize("global_pool", [True, False])  # main_finetune.py's default, and its --cls_token
def test_reference_fine_tuned_classifier_computes_what_timm_computes(tmp_path, global_pool):
    """A main_finetune.py checkpoint is a timm VisionTransformer (MAE's models_vit) with a TRAINED
    pos_embed: the converted MaeForImageClassification keeps it and gives timm's logits."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    reference = vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, qkv_bias=True, num_classes=5,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), global_pool="avg" if global_pool else "token",
        fc_norm=global_pool,
    )
    with torch.no_grad():
        perturb_parameters_(reference, scale=0.2).eval()  # the table is far from sin-cos, as after fine-tuning
    torch.save({"model": reference.state_dict()}, tmp_path / "mae_finetuned_tiny.pth")
    run_convert(tmp_path / "mae_finetuned_tiny.pth", tmp_path / "out", "num_attention_heads=4")
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert type(model) is MaeForImageClassification and model.config.num_labels == 5
    assert model.config.use_mean_pooling is global_pool and model.config.learned_position_embeddings
    assert torch.equal(model.encoder.pos_embed, reference.pos_embed)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels), rtol=1e-5, atol=1e-5)


def test_non_square_reference_checkpoint_needs_image_size(tmp_path):
    original = random_mae(image_size=[32, 48])
    src = reference_checkpoint(original, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"24 patch positions, not a square grid.*image_size"):
        run_convert(src, tmp_path / "out", *TINY_HEADS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_convert(src, tmp_path / "out", *TINY_HEADS, "image_size=[32,48]")
    assert no_table_warnings(record)  # the 4x6 table was checked and matched
    model = AutoModelForPreTraining.from_pretrained(tmp_path / "out").eval()
    pixels, noise = torch.randn(1, 3, 32, 48), torch.rand(1, 24)
    with torch.no_grad():
        assert torch.equal(model(pixels, noise=noise).logits, original(pixels, noise=noise).logits)


def test_published_width_defaults(tmp_path):
    """A 768-wide encoder gets ViT-B's 12 heads and the reference's eps without any --config."""
    torch.manual_seed(0)
    state_dict = {
        "cls_token": torch.randn(1, 1, 768),
        "pos_embed": torch.from_numpy(reference_sincos_table(2, 2, 768)).float()[None],
        "patch_embed.proj.weight": torch.randn(768, 3, 16, 16) * 0.02, "patch_embed.proj.bias": torch.zeros(768),
        "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
    }
    for name, shape in [("norm1", (768,)), ("norm2", (768,)), ("attn.qkv", (2304, 768)), ("attn.proj", (768, 768)),
                        ("mlp.fc1", (64, 768)), ("mlp.fc2", (768, 64))]:
        state_dict[f"blocks.0.{name}.weight"] = torch.randn(shape) * 0.02
        state_dict[f"blocks.0.{name}.bias"] = torch.zeros(shape[0])
    torch.save({"model": state_dict}, tmp_path / "b.pth")
    config = run_convert(tmp_path / "b.pth", tmp_path / "out").config
    assert (config.num_attention_heads, config.layer_norm_eps, config.mask_ratio) == (12, 1e-6, 0.75)
    assert (config.image_size, config.patch_size, config.num_channels) == (32, 16, 3)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (768, 1, 64)
    assert config.qkv_bias is True and config.norm_pix_loss is True


def test_config_overrides_and_their_errors(tmp_path):
    src = reference_checkpoint(random_mae(), tmp_path / "tiny.pth")
    heads = TINY_HEADS
    config = run_convert(src, tmp_path / "a", *heads, "mask_ratio=0.6", "norm_pix_loss=true",
                         "layer_norm_eps=1e-5").config
    assert (config.mask_ratio, config.norm_pix_loss, config.layer_norm_eps) == (0.6, True, 1e-5)
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (saved["mask_ratio"], saved["norm_pix_loss"]) == (0.6, True)
    with pytest.raises(ValueError, match=r"hidden_size=64 but the weights have hidden_size=32"):
        run_convert(src, tmp_path / "b", *heads, "hidden_size=64")
    with pytest.raises(ValueError, match=r"\['not_a_field'\] are not MaeConfig fields"):
        run_convert(src, tmp_path / "b", *heads, "not_a_field=1")
    with pytest.raises(ValueError, match="cannot tell the number of attention heads.*num_attention_heads=N"):
        run_convert(src, tmp_path / "b", "decoder_num_attention_heads=2")
    with pytest.raises(ValueError, match="decoder_hidden_size=16 is not divisible by decoder_num_attention_heads=3"):
        run_convert(src, tmp_path / "b", "num_attention_heads=4", "decoder_num_attention_heads=3")
    with pytest.raises(ValueError, match="mask_ratio"):
        run_convert(src, tmp_path / "b", *heads, "mask_ratio=1.0")


def test_cli_subprocess(tmp_path):
    src = reference_checkpoint(random_mae(), tmp_path / "tiny.pth")
    env = {**os.environ, "PYTHONPATH": REPO_SRC}
    result = subprocess.run(
        [sys.executable, "-m", "hf_mim.convert", "mae", str(src), str(tmp_path / "out"),
         "--config", "num_attention_heads=4", "decoder_num_attention_heads=2", "mask_ratio=0.5"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Saved MaeForPreTraining" in result.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mask_ratio"] == 0.5


# ---------------------------------------------------------------------------------------------
# Wrong input: clear errors
# ---------------------------------------------------------------------------------------------


def test_wrong_kind_errors(tmp_path, capsys):
    beit = {"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
            "blocks.0.attn.qkv.weight": torch.zeros(24, 8), "blocks.0.attn.q_bias": torch.zeros(8),
            "blocks.0.attn.v_bias": torch.zeros(8), "rel_pos_bias.relative_position_bias_table": torch.zeros(3, 2)}
    torch.save({"model": beit}, tmp_path / "beit.pth")
    with pytest.raises(ValueError, match="looks like a BEiT checkpoint"):
        run_convert(tmp_path / "beit.pth", tmp_path / "out")

    with_decoder = {**reference_state(tmp_path), "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    torch.save({"model": with_decoder}, tmp_path / "finetuned.pth")
    with pytest.raises(ValueError, match="both a classification head and an MAE decoder"):
        run_convert(tmp_path / "finetuned.pth", tmp_path / "out")
    no_table = {k: v for k, v in with_decoder.items() if k != "pos_embed"}
    torch.save({"model": no_table}, tmp_path / "no_table.pth")
    with pytest.raises(ValueError, match="without its position table"):
        run_convert(tmp_path / "no_table.pth", tmp_path / "out")

    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not look like an MAE checkpoint"):
        run_convert(tmp_path / "other.pth", tmp_path / "out")

    extra = {**reference_state(tmp_path), "blocks.0.attn.extra.weight": torch.zeros(2)}
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"not part of an MAE model: \['blocks.0.attn.extra.weight'\]"):
        run_convert(tmp_path / "extra.pth", tmp_path / "out", *TINY_HEADS)

    (tmp_path / "random.pth").write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="is damaged or not a PyTorch checkpoint"):
        run_convert(tmp_path / "random.pth", tmp_path / "out")

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(ValueError, match="model_type 'vit', not 'vit_mae'"):
        run_convert(tmp_path / "vit", tmp_path / "out")

    random_mae().save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="already is an hf_mim directory"):
        run_convert(tmp_path / "ours", tmp_path / "out")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory without config.json"):
        run_convert(tmp_path / "empty", tmp_path / "out")

    # Through the CLI entry point: exit status 2 and the message, no traceback.
    assert main(["mae", str(tmp_path / "beit.pth"), str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def reference_state(tmp_path: Path) -> dict:
    return torch.load(reference_checkpoint(random_mae(), tmp_path / "state.pth"), weights_only=True)["model"]


def test_missing_keys_are_named(tmp_path):
    state_dict = reference_state(tmp_path)
    del state_dict["decoder_blocks.0.norm1.weight"]
    torch.save({"model": state_dict}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing \['decoder.blocks.0.norm1.weight'\]"):
        run_convert(tmp_path / "partial.pth", tmp_path / "out", *TINY_HEADS)


def test_shape_mismatch_is_a_clear_error(tmp_path):
    state_dict = reference_state(tmp_path)
    state_dict["decoder_pred.weight"] = state_dict["decoder_pred.weight"][:100]  # not 8*8*3 pixels per patch
    state_dict["decoder_pred.bias"] = state_dict["decoder_pred.bias"][:100]
    torch.save({"model": state_dict}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="(?s)The weights do not fit the config.*decoder.pred.weight"):
        run_convert(tmp_path / "bad.pth", tmp_path / "out", *TINY_HEADS)
