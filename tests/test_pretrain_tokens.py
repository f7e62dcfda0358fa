"""`examples/pretrain.py --method beit|beitv2|peco|vit_mpp` on the embedded digits, with tiny random
tokenizers saved to disk: checkpoints, cards and figures, tokenizer checks, the same-crop views, the
v2 CLS head's loss, exact resume, and a learning check against the majority-token baseline."""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate
from transformers import AutoModelForPreTraining

from hf_mim.data import FixedSampler, ImageExamples, load_image_datasets
from hf_mim.models import BEiTForMaskedImageModeling, DvaeConfig, DvaeTokenizer, PecoConfig, PecoTokenizer
from hf_mim.models import VitMppForPreTraining, VqkdConfig, VqkdTokenizer
from hf_mim.models.masking import ExactBlockwiseMaskGenerator
from hf_mim.pretraining import build_parser, get_method, main, parse_args
from hf_mim.models.losses import masked_token_losses
from hf_mim.pretraining.methods.token_targets import (
    TargetHealth, TwoViewCrop, load_frozen_tokenizer, resolve_precision,
)
from hf_mim.training.tracking import LOG_FILE, read_log

# 32 training images in batches of 8: 4 micro-batches per epoch.
FAST = ["--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0"]
CODES = 32  # every tiny tokenizer's vocabulary


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models on a shared 2-core machine: one thread (the loop keeps it when OMP_NUM_THREADS is set)."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Tiny random tokenizers for the demo's 8x8 patch grid (32 px images, patch 4), saved like real ones,
    plus one whose grid is 4x4."""
    root = tmp_path_factory.mktemp("tokenizers")
    vqkd = dict(image_size=32, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2, decoder_intermediate_size=32, code_dim=8, num_codes=CODES,
                teacher_dim=8, teacher_name_or_path=None, teacher_type="auto")
    built = {
        # 3 groups: 4x downsampling, so the 8x8 grid reads a 32 px view.
        "dvae": lambda: DvaeTokenizer(DvaeConfig(hidden_size=8, vocab_size=CODES, num_groups=3, num_blocks_per_group=1,
                                         with_decoder=False, reference_fp16=False)),
        "vqkd": lambda: VqkdTokenizer(VqkdConfig(**vqkd)),
        "vqkd-4x4": lambda: VqkdTokenizer(VqkdConfig(**{**vqkd, "patch_size": 8})),
        "peco": lambda: PecoTokenizer(PecoConfig(image_size=32, downsample_factor=4, hidden_size=8, num_res_blocks=1,
                                                 norm_num_groups=4, code_dim=8, num_codes=CODES)),
        # Its random draw spreads the digits' masked patches over several tokens (the most frequent: ~1/3),
        # which leaves room above the majority baseline for the learning check.
        "dvae-16": lambda: DvaeTokenizer(DvaeConfig(hidden_size=8, vocab_size=16, num_groups=3, num_blocks_per_group=1,
                                                    with_decoder=False, reference_fp16=False)),
    }
    paths = {}
    for name, build in built.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        paths[name] = root / name
    # A collapsed tokenizer: every code vector the same, so every patch gets code 0 (1 of 32 codes used).
    collapsed = VqkdTokenizer(VqkdConfig(**vqkd))
    with torch.no_grad():
        collapsed.quantize.embedding.weight.copy_(collapsed.quantize.embedding.weight[:1].expand(CODES, -1))
    collapsed.save_pretrained(root / "collapsed")
    paths["collapsed"] = root / "collapsed"
    return paths


def run_args(method: str, output_dir: Path, tokenizer: Path | None, *extra: str) -> list[str]:
    args = ["--method", method, "--output_dir", str(output_dir), *FAST, *extra]
    return args + (["--tokenizer", str(tokenizer)] if tokenizer else [])


def losses(output_dir: Path) -> dict[int, float]:
    return read_log(str(output_dir / LOG_FILE), "loss")


# ---------------------------------------------------------------------------------------------
# The same crop for the model and the tokenizer
# ---------------------------------------------------------------------------------------------


def coordinate_image(width: int = 64, height: int = 48) -> Image.Image:
    """Red = column, green = row (both 0..255), blue constant: every pixel says where it came from."""
    columns = torch.linspace(0, 255, width).expand(height, width)
    rows = torch.linspace(0, 255, height)[:, None].expand(height, width)
    pixels = torch.stack([columns, rows, torch.full_like(columns, 128)], dim=-1).round().to(torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def test_two_views_cover_the_same_crop_box():
    """Colour jitter, flip and the crop box are drawn once: the tokenizer view is the model view at half
    the size (up to resampling), in [0, 1]; another example gets another box."""
    views = TwoViewCrop(32, 16, scale=(0.08, 1.0), color_jitter=0.4)  # bicubic and LANCZOS, as BEiT
    image, corners = coordinate_image(), set()
    for seed in range(12):
        torch.manual_seed(seed)
        model_view, tokenizer_view = views(image)
        assert model_view.shape == (3, 32, 32) and tokenizer_view.shape == (3, 16, 16)
        assert 0.0 <= float(tokenizer_view.min()) and float(tokenizer_view.max()) <= 1.0
        torch.testing.assert_close(F.avg_pool2d(model_view[None], 2)[0], tokenizer_view, atol=0.03, rtol=0)
        corners.add(tuple(model_view[:2, 0, 0].mul(255).round().tolist()))
    assert len(corners) > 8  # the boxes (and flips) really vary


# ---------------------------------------------------------------------------------------------
# End-to-end runs
# ---------------------------------------------------------------------------------------------


def beit_args(output_dir: Path, tokenizers) -> list[str]:
    # drop path on (BEiT's default 0.1 raised): the model's own randomness must be restored on resume too.
    # 16 images in batches of 8: 2 micro-batches per epoch, so checkpoint-3 lies inside epoch 1.
    return run_args("beit", output_dir, tokenizers["dvae"], "--max_steps", "4", "--checkpointing_steps", "3",
                    "--save_total_limit", "0", "--max_train_samples", "16", "--config_overrides",
                    "drop_path_rate=0.2")


@pytest.fixture(scope="module")
def beit_run(tmp_path_factory, tokenizers) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("beit") / "run"
    return output_dir, main(beit_args(output_dir, tokenizers))


@pytest.fixture(scope="module", params=["beitv2", "peco", "vit_mpp"])
def short_run(request, tmp_path_factory, tokenizers) -> tuple[str, Path, dict]:
    method = request.param
    output_dir = tmp_path_factory.mktemp(method) / "run"
    tokenizer = {"beitv2": tokenizers["vqkd"], "peco": tokenizers["peco"]}.get(method)
    return method, output_dir, main(run_args(method, output_dir, tokenizer, "--max_steps", "2",
                                             "--checkpointing_steps", "no"))


def check_run(method: str, output_dir: Path, results: dict, tokenizer: Path | None) -> None:
    model = AutoModelForPreTraining.from_pretrained(output_dir)
    expected = VitMppForPreTraining if method == "vit_mpp" else BEiTForMaskedImageModeling
    assert type(model) is expected
    prefixes = {key.split(".")[0] for key in load_file(output_dir / "model.safetensors")}
    allowed = {"vit", "mpp_head"} if method == "vit_mpp" else {"beit", "lm_head", "cls_pt_layers"}
    assert prefixes <= allowed, f"weights that are not the model's (a tokenizer?): {prefixes - allowed}"
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and math.isfinite(results["eval_loss"])
    logged = read_log(str(output_dir / LOG_FILE), "masked_accuracy")
    assert sorted(logged) == list(range(1, results["train_steps"] + 1))
    assert (output_dir / "reconstructions.png").stat().st_size > 10_000
    card = (output_dir / "README.md").read_text()
    if tokenizer is not None:
        assert model.config.vocab_size == CODES  # taken from the tokenizer
        assert f"`{tokenizer}`" in card  # the card names the targets' tokenizer


def test_beit_run_writes_a_loadable_model_without_the_tokenizer(beit_run, tokenizers):
    output_dir, results = beit_run
    check_run("beit", output_dir, results, tokenizers["dvae"])
    masking = AutoModelForPreTraining.from_pretrained(output_dir).config
    assert masking.use_cls_pretext_head is False
    # The option names everywhere a user reads the run back: the saved image processor and the card.
    saved = json.loads((output_dir / "preprocessor_config.json").read_text())["mask_generator_kwargs"]
    assert set(saved) == {"num_mask_patches", "min_mask_patches_per_block", "max_mask_patches_per_block"}
    card = (output_dir / "README.md").read_text()
    shown = [name for name, value in saved.items() if value is not None] + ["crop_min_scale"]  # None: not shown
    assert len(shown) == 3 and all(f"| `{name}` |" in card for name in shown)


def test_other_methods_write_loadable_models(short_run, tokenizers):
    method, output_dir, results = short_run
    tokenizer = {"beitv2": tokenizers["vqkd"], "peco": tokenizers["peco"]}.get(method)
    check_run(method, output_dir, results, tokenizer)
    if method == "beitv2":
        assert "cls_pt_layers" in {key.split(".")[0] for key in load_file(output_dir / "model.safetensors")}
        assert results["eval_loss"] == pytest.approx(results["eval_mim_loss"] + results["eval_cls_head_loss"])


# ---------------------------------------------------------------------------------------------
# The loss, directly
# ---------------------------------------------------------------------------------------------


def method_and_batch(argv: list[str], train: bool = True, count: int = 4):
    """A method with its model, and a batch built by its transform: `count` training digits, or the
    evaluation images of the run `argv` describes, in the loop's order and with its fixed masks."""
    args = parse_args(argv)
    method = get_method(args.method)(args)
    model = method.build_model(f"{args.method}-demo")
    data = load_image_datasets(train_val_split=args.train_val_split, seed=args.data_seed,
                               max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples)
    processor = method.build_image_processor()
    split, transform = (data.train, method.train_transform) if train else (data.eval, method.eval_transform)
    examples = ImageExamples(split, data.image_column, transform(processor))
    keys = list(FixedSampler(len(examples), args.data_seed))[: count if train else None]
    batch = default_collate([examples[key] for key in keys])
    batch.pop("num_skipped")
    return method, model, batch


def test_beitv2_training_loss_includes_the_cls_head(tmp_path, tokenizers):
    method, model, batch = method_and_batch(run_args("beitv2", tmp_path, tokenizers["vqkd"]))
    views = batch["tokenizer_pixel_values"]  # the tokenizer's own 32 px input, unnormalised
    assert views.shape == (4, 3, 32, 32) and 0.0 <= float(views.min()) and float(views.max()) <= 1.0
    # beit2's masking: every mask has exactly the target count (v1's blockwise masks may fall short)
    assert isinstance(method.build_masks(), ExactBlockwiseMaskGenerator)
    assert batch["bool_masked_pos"].sum(1).tolist() == [method.mask_generator_kwargs()["num_mask_patches"]] * 4
    torch.manual_seed(0)
    loss = method.training_loss(model, batch)
    torch.manual_seed(0)
    output, _, _ = method.forward_masked(model, batch)
    assert output.cls_head_loss > 0
    torch.testing.assert_close(loss, output.mim_loss + output.cls_head_loss)
    loss.backward()
    head_grads = [p.grad for p in model.cls_pt_layers.parameters()]
    assert all(g is not None for g in head_grads) and sum(float(g.abs().sum()) for g in head_grads) > 0
    assert all(p.grad is None for p in method.tokenizer.model.parameters())  # frozen


def test_beitv2_trains_a_cls_head_with_its_own_lm_head(tmp_path, tokenizers):
    """beit2's shared_lm_head=False: the head's own norm and LM head are trained, saved and loaded."""
    output_dir = tmp_path / "run"
    main(run_args("beitv2", output_dir, tokenizers["vqkd"], "--max_steps", "2", "--checkpointing_steps", "no",
                  "--max_train_samples", "16", "--config_overrides", "shared_lm_head=False"))
    model = AutoModelForPreTraining.from_pretrained(output_dir)
    assert model.config.shared_lm_head is False
    initial = BEiTForMaskedImageModeling(model.config)  # a fresh head: the trained one has moved away from it
    saved = load_file(output_dir / "model.safetensors")
    assert {"cls_pt_norm.weight", "cls_pt_lm_head.weight"} <= set(saved)
    torch.testing.assert_close(model.cls_pt_lm_head.weight, saved["cls_pt_lm_head.weight"])
    assert not torch.equal(model.cls_pt_norm.weight, initial.cls_pt_norm.weight)  # ones at init, trained here


def test_a_batch_without_masked_patches_gives_zero_not_nan(tmp_path, tokenizers):
    method, model, batch = method_and_batch(run_args("beit", tmp_path, tokenizers["dvae"]))
    batch["bool_masked_pos"] = torch.zeros_like(batch["bool_masked_pos"])
    loss = method.training_loss(model, batch)
    assert float(loss.detach()) == 0.0 and loss.requires_grad  # zero, with the graph kept for backward
    with torch.no_grad():  # as the loop's evaluation
        sums = method.eval_sums(model, batch)
    assert all(float(value.sum()) == 0.0 for value in sums.values())
    assert method.eval_metrics({key: 0.0 for key in sums}) == {"loss": 0.0, "accuracy": 0.0}


def test_per_sample_losses_are_per_image():
    mask = torch.tensor([[True, False, True], [False, False, True]])  # 2 masked in image 0, 1 in image 1
    targets = torch.tensor([[1, 0, 2], [0, 0, 1]])
    logits = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 9.0, 0.0]])  # right, wrong, right
    result = masked_token_losses(logits, targets[mask], mask.nonzero()[:, 0], batch=2)
    masked = mask.sum(-1).float()  # [2, 1]: what the evaluation weighs each image's values with
    assert (result.per_sample_accuracy * masked).tolist() == [1.0, 1.0]
    expected = F.cross_entropy(logits, targets[mask], reduction="none")
    torch.testing.assert_close(result.per_sample_loss * masked, torch.stack([expected[0] + expected[1], expected[2]]))
    torch.testing.assert_close(result.loss, expected.mean())  # the training loss: the same per-token losses


# ---------------------------------------------------------------------------------------------
# Tokenizer and argument checks
# ---------------------------------------------------------------------------------------------


def test_token_methods_are_command_line_choices():
    choices = next(a for a in build_parser()._actions if a.dest == "method").choices
    assert {"mae", "beit", "beitv2", "peco", "vit_mpp"} <= set(choices)
    options = {option for action in build_parser("beitv2")._actions for option in action.option_strings}
    assert {"--tokenizer", "--tokenizer_revision", "--num_mask_patches", "--min_mask_patches_per_block",
            "--max_mask_patches_per_block"} <= options


@pytest.mark.parametrize("method", ["beit", "beitv2", "peco"])
def test_missing_tokenizer_is_a_clear_error(tmp_path, method):
    with pytest.raises(ValueError, match="--tokenizer PATH_OR_ID"):
        main(run_args(method, tmp_path / "out", None, "--max_steps", "1"))


@pytest.mark.parametrize("method", ["beit", "beitv2"])
@pytest.mark.parametrize("counts, message", [
    (["--num_mask_patches", "65"], r"num_mask_patches=65 must be between 1 and the 64 patches of the 8x8 grid"),
    (["--num_mask_patches", "20", "--min_mask_patches_per_block", "21"], r"min_mask_patches_per_block=21 must be"),
])
def test_a_mask_count_error_names_the_option_before_training(tmp_path, tokenizers, method, counts, message):
    """The blockwise generator's errors name the script's options (one spelling), before any step is taken."""
    tokenizer = tokenizers["dvae" if method == "beit" else "vqkd"]
    with pytest.raises(ValueError, match=message):
        main(run_args(method, tmp_path / "out", tokenizer, "--max_steps", "1", *counts))
    assert not (tmp_path / "out" / "log.jsonl").exists()


@pytest.mark.parametrize("case, message", [
    ("grid", r"4x4 token grid, but the model has a 8x8 patch grid"),
    ("vocab_override", r"vocab_size=64 conflicts with the 32 codes"),
    ("peco_needs_peco", r"--method peco uses a hf_mim_peco tokenizer"),
], ids=["grid", "vocab_override", "peco_needs_peco"])
def test_tokenizer_mismatch_is_a_clear_error(tmp_path, tokenizers, case, message):
    method, tokenizer, extra = {
        "grid": ("beitv2", tokenizers["vqkd-4x4"], []),
        "vocab_override": ("beit", tokenizers["dvae"], ["--config_overrides", "vocab_size=64"]),
        "peco_needs_peco": ("peco", tokenizers["dvae"], []),
    }[case]
    with pytest.raises(ValueError, match=message):
        main(run_args(method, tmp_path / "out", tokenizer, "--max_steps", "1", *extra))


def test_tokenizer_precision_modes(tokenizers):
    """reference_fp16 switches the dVAE to its fp16 convolutions (whatever its saved config says); other
    tokenizers have no such mode. On CPU, autocast precisions mean fp32 (autocast is for CUDA only)."""
    reference = load_frozen_tokenizer(str(tokenizers["dvae"]), None, "reference_fp16", {})
    assert reference.model.config.reference_fp16 and reference.precision == "reference_fp16"
    assert load_frozen_tokenizer(str(tokenizers["dvae"]), None, "bf16", {}).precision == "torch.float32"
    with pytest.raises(ValueError, match="reference_fp16 is the DALL-E dVAE's fp16 mode"):
        load_frozen_tokenizer(str(tokenizers["vqkd"]), None, "reference_fp16", {})


@pytest.mark.parametrize("model_type, saved_fp16, asked, expected", [
    ("hf_mim_dvae", True, "reference", "reference_fp16"),  # converted DALL-E weights: its fp16 convolutions
    ("hf_mim_dvae", False, "reference", "fp32"),  # a dVAE trained here asks for fp32
    ("hf_mim_vqkd", None, "reference", "fp16"),  # beit2: fp16 autocast
    ("hf_mim_peco", None, "reference", "fp32"),
    ("hf_mim_dvae", True, "fp32", "fp32"),  # the user's choice wins over the config
    ("hf_mim_vqkd", None, "bf16", "bf16"),
])
def test_reference_precision_resolves_per_tokenizer(model_type, saved_fp16, asked, expected):
    config = SimpleNamespace(model_type=model_type, reference_fp16=saved_fp16)
    precision, why = resolve_precision(asked, config)
    assert precision == expected and why
    with pytest.raises(ValueError, match="choose one of reference, fp32"):
        resolve_precision("fp8", config)
    if model_type != "hf_mim_dvae":  # the dVAE's own fp16 mode, refused for any other tokenizer
        with pytest.raises(ValueError, match=f"reference_fp16 is the DALL-E dVAE's fp16 mode, but tok is a '{model_type}'"):
            resolve_precision("reference_fp16", config, "tok")


def test_default_precision_keeps_the_converted_dvae_fp16_and_logs_it(tokenizers, tmp_path, caplog):
    """The default (reference) no longer overrides a converted dVAE's reference_fp16; the log says so."""
    dvae = DvaeTokenizer.from_pretrained(tokenizers["dvae"], reference_fp16=True)
    dvae.save_pretrained(tmp_path / "dvae-fp16")
    default = build_parser("beit").parse_args_into_dataclasses(args=["--method", "beit"], look_for_args_file=False)
    precision = next(group.tokenizer_precision for group in default if hasattr(group, "tokenizer_precision"))
    with caplog.at_level(logging.INFO, logger="hf_mim"):
        frozen = load_frozen_tokenizer(str(tmp_path / "dvae-fp16"), None, precision, {})
    assert precision == "reference" and frozen.precision == "reference_fp16"
    assert "Tokenizer targets computed in reference_fp16 (the reference" in caplog.text


def test_token_agreement_against_fp32(tokenizers):
    """fp32 agrees with itself exactly; the dVAE's fp16 convolutions flip some near-tie tokens (never
    more than a few percent), and the fp32 pass leaves the fp16 mode in place."""
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fp32 = load_frozen_tokenizer(str(tokenizers["dvae"]), None, "fp32", {})
    assert fp32.token_agreement(images) == 1.0
    fp16 = load_frozen_tokenizer(str(tokenizers["dvae"]), None, "reference_fp16", {})
    agreement = fp16.token_agreement(images)
    assert 0.9 < agreement <= 1.0
    assert torch.equal(fp16.fp32_tokens(images), fp32(images))
    assert fp16.precision == "reference_fp16" and not torch.equal(
        fp16.model.get_codebook_logits(images), fp32.model.get_codebook_logits(images))


def test_a_checkpoint_keeps_its_vocabulary(beit_run, tokenizers, tmp_path):
    """Continuing a 32-token model with a 16-code tokenizer is refused, naming both sizes."""
    small = tokenizers["dvae-16"]
    with pytest.raises(ValueError, match="predicts 32 visual tokens .* has 16 codes"):
        main(run_args("beit", tmp_path / "out", small, "--max_steps", "1", "--model_name_or_path", str(beit_run[0])))


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


def test_resumed_beit_run_equals_uninterrupted_run(beit_run, tokenizers, tmp_path):
    """An interrupted run leaves checkpoint-3 (epoch 1, batch 1); re-running the command continues to the
    same losses and weights as the uninterrupted run."""
    uninterrupted, _ = beit_run
    assert sorted(p.name for p in uninterrupted.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    resumed = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoint-3", resumed / "checkpoint-3")
    main(beit_args(resumed, tokenizers))
    expected, got = losses(uninterrupted), losses(resumed)
    assert sorted(got) == [4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    ours, theirs = load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Learning check
# ---------------------------------------------------------------------------------------------


def test_beit_learns_more_than_the_majority_token(tmp_path, tokenizers):
    """A short BEiT run on the digits beats, on held-out images with their fixed masks, always predicting
    the most frequent token of those masked patches. The random tokenizer is fine: its tokens are still a
    deterministic function of the image. Absolute position embeddings (a BEiTConfig option) make it
    fast: with only BEiT's zero-initialised relative bias, this tiny model needs many more steps to
    learn where a masked patch is, and predicts the marginal token distribution meanwhile."""
    argv = run_args(
        "beit", tmp_path / "learn", tokenizers["dvae-16"], "--max_train_samples", "640", "--max_eval_samples", "64",
        "--per_device_train_batch_size", "32", "--max_steps", "45", "--learning_rate", "2e-3", "--warmup_steps", "10",
        "--logging_steps", "10", "--checkpointing_steps", "no", "--config_overrides",
        "hidden_size=64,intermediate_size=256,num_hidden_layers=2,drop_path_rate=0.0,"
        "use_absolute_position_embeddings=True",
    )
    method, _, batch = method_and_batch(argv, train=False)
    mask = batch["bool_masked_pos"]  # [64, 64]
    masked_tokens = method.tokenizer(batch["tokenizer_pixel_values"])[mask]  # [M]
    majority = float(torch.bincount(masked_tokens).max()) / len(masked_tokens)
    results = main(argv)
    print(f"held-out masked-token accuracy {results['eval_accuracy']:.3f}, majority baseline {majority:.3f}")
    assert results["eval_samples"] == len(mask)
    assert results["eval_accuracy"] > majority + 0.08


# ---------------------------------------------------------------------------------------------
# Tokenizer health: degenerate targets are refused, not reported as 100% accuracy
# ---------------------------------------------------------------------------------------------


def test_a_collapsed_tokenizer_is_refused(tmp_path, tokenizers):
    with pytest.raises(ValueError, match=r"degenerate targets: .* used 1 of its 32 codes.*100%.*--allow_degenerate_t"):
        main(run_args("beit", tmp_path / "out", tokenizers["collapsed"], "--max_steps", "2", "--no-do_eval",
                      "--checkpointing_steps", "no"))


def test_below_health_targets_warn_with_usage_and_perplexity():
    """Like the issue's dVAE (7 of 64 codes, perplexity 2.7) but with no code on half the patches: no
    refusal, no skew warning, yet the below-health warning, with the numbers; a healthy spread is silent."""
    counts = torch.tensor([480, 250, 150, 80, 40, 15, 9])  # 1,024 tokens on 7 codes, the largest share 47%
    targets = torch.repeat_interleave(torch.arange(7), counts).reshape(2, 8, 64)
    health = TargetHealth(vocab_size=64, source="tok", batches=2)
    health.add(targets[0])
    with pytest.warns(RuntimeWarning, match=r"below-health targets: its 1024 tokens .* used 7 of its 64 codes "
                                            r"\(fewer than 50% of the 64 they could use; perplexity 4\.1\)") as caught:
        health.add(targets[1])
    assert not any("skewed" in str(warning.message) for warning in caught)
    assert health.report["target_codes_used"] == 7 and health.report["target_perplexity"] == pytest.approx(4.1, abs=0.05)
    healthy = TargetHealth(vocab_size=64, source="tok", batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        healthy.add(torch.arange(64).repeat(4, 1)[:, torch.randperm(64)])  # every code: silent
        TargetHealth(vocab_size=64, source="tok", batches=1).add(torch.arange(20).reshape(1, 20))  # 20 of 20 possible


def test_degenerate_targets_can_be_allowed_with_a_warning():
    health = TargetHealth(vocab_size=4, source="tok", batches=2, allow_degenerate=True)
    health.add(torch.zeros(2, 8, dtype=torch.long))
    assert health.report is None  # measured on the first 2 batches, not on one
    with pytest.warns(RuntimeWarning, match=r"skewed targets: .* used 2 of its 4 codes.* 94% of the patches"):
        health.add(torch.tensor([[0] * 7 + [3]] * 2))
    assert {key: health.report[key] for key in ("target_codes_used", "target_majority_share")} == {
        "target_codes_used": 2, "target_majority_share": 30 / 32}
    health.add(torch.zeros(2, 8, dtype=torch.long))  # checked once
    healthy = TargetHealth(vocab_size=4, source="tok", batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        healthy.add(torch.arange(4).repeat(2, 2))  # every code a quarter of the time: silent
    assert healthy.report["target_codes_used"] == 4
