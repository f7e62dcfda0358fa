"""`examples/train_tokenizer.py` end to end on CPU: real runs of the training engine's one loop on the embedded
digits (32 px, 8x8 tokens, 64 codes) with tiny teachers / perceptual networks built from configs, one real
two-process `accelerate launch` (gloo), and the errors a user meets first.

Runs are in-process (`hf_mim.tokenizer_training.main`) except the two-process one; each run is shared by
the tests that read its outputs (module-scoped fixtures), to keep the file within a few CPU minutes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModel

import hf_mim  # noqa: F401  (registers the tokenizers with the Auto classes)
from hf_mim.teachers import TeacherLoadError
from hf_mim.tokenizer_training import build_parser, main
from hf_mim.tokenizer_training.methods import codebook_fingerprint

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "examples" / "train_tokenizer.py"
CPU_2PROC = REPO / "examples" / "accelerate_configs" / "cpu_2proc.yaml"
FIGURES = ("codebook_usage.png", "token_maps.png")
# Small and fast: 192 training images, 32 held out, no checkpoints, no tensorboard.
QUICK = ["--max_train_samples", "192", "--max_eval_samples", "32", "--per_device_train_batch_size", "32",
         "--per_device_eval_batch_size", "32", "--dataloader_num_workers", "0", "--report_to", "none",
         "--checkpointing_steps", "no", "--resume_from_checkpoint", "none"]


def save_tiny_vit(path: Path, patch_size: int = 4, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random but fixed transformers ViT (its features depend on the image) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    vit = ViTModel(ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                             intermediate_size=2 * hidden_size, image_size=32, patch_size=patch_size,
                             layer_norm_eps=1e-6), add_pooling_layer=False)
    vit.save_pretrained(path)
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(path)
    return path


def save_tiny_mae(path: Path) -> Path:
    """This package's MAE (no image processor saved: the PeCo config's mean/std apply)."""
    from hf_mim import MaeConfig, MaeForPreTraining

    torch.manual_seed(0)
    MaeForPreTraining(MaeConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=4,
        decoder_hidden_size=16, decoder_num_attention_heads=2, decoder_num_hidden_layers=1,
        decoder_intermediate_size=32,
    )).save_pretrained(path)
    return path


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(training step records in order, evaluation records in order) of log.jsonl."""
    records = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("step") is not None and "loss" in r]
    evals = [r for r in records if any(key.startswith("eval_") for key in r)]
    return train, evals


def digit_images(count: int = 4) -> list[Image.Image]:
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count]
    return [Image.fromarray((255 - d * 255 / 16).astype("uint8")).convert("RGB") for d in digits]


def weight_keys(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", "pt") as file:
        return set(file.keys())


def check_saved_tokenizer(out: Path, model_type: str, grid=(8, 8)):
    """The folder loads with AutoModel / AutoImageProcessor and tokenizes real images; returns the tokenizer."""
    tokenizer = AutoModel.from_pretrained(out).eval()
    assert tokenizer.config.model_type == model_type
    processor = AutoImageProcessor.from_pretrained(out)
    pixels = processor(digit_images(), return_tensors="pt")["pixel_values"]  # [4, 3, 32, 32] in [0, 1]
    assert pixels.min() >= -0.1 and pixels.max() <= 1.1  # no mean/std: the tokenizers take [0, 1]
    ids = tokenizer.get_codebook_indices(pixels)
    assert ids.shape == (4, *grid) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < tokenizer.vocab_size
    assert torch.equal(ids, tokenizer.get_codebook_indices(pixels))
    assert set(weight_keys(out)) == set(tokenizer.state_dict())  # nothing but the tokenizer in the file
    for name in FIGURES:
        assert (out / name).stat().st_size > 1000, name
    assert (out / "README.md").is_file()
    return tokenizer


@pytest.fixture(autouse=True)
def quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the loop then leaves torch's thread count alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# VQ-KD: the learning check and the saved tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqkd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqkd")
    teacher = save_tiny_vit(root / "teacher")
    out = root / "out"
    results = main(["--method", "vqkd", "--teacher", str(teacher), "--output_dir", str(out), "--max_steps", "15",
                    "--eval_strategy", "steps", "--eval_steps", "15", "--eval_on_start",
                    "--config_overrides", "num_codes=32", *QUICK])
    return out, teacher, results


def test_vqkd_learning_check_loss_falls_and_most_codes_are_used(vqkd_run):
    out, _, results = vqkd_run
    train, evals = read_log(out)
    assert [r["step"] for r in train] == list(range(1, 16))  # every step logged
    first = sum(r["distillation_loss"] for r in train[:5]) / 5
    last = sum(r["distillation_loss"] for r in train[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 15
    assert evals[-1]["eval_distillation_loss"] < 0.5 * evals[0]["eval_distillation_loss"]  # measured: 1.02 -> 0.16
    assert results["eval_codebook_usage"] > 0.5  # more than half of the 32 codes on held-out images (measured 0.84)
    for record in train:  # codebook health at every step
        assert 0 < record["codebook_usage"] <= 1 and record["perplexity"] >= 1 and record["dead_codes"] >= 0
        assert record["commitment_loss"] >= 0


def test_vqkd_saves_a_tokenizer_without_the_teacher(vqkd_run):
    out, teacher, _ = vqkd_run
    tokenizer = check_saved_tokenizer(out, "hf_mim_vqkd")
    teacher_keys = weight_keys(teacher)
    assert teacher_keys and not any(key.endswith(tuple(teacher_keys)) for key in weight_keys(out))
    assert tokenizer.config.teacher_name_or_path == str(teacher) and tokenizer.config.teacher_dim == 32
    assert not (out / "teachers.py").exists()
    # The saved codebook is the one the last training step reported.
    train, _ = read_log(out)
    assert codebook_fingerprint(tokenizer.quantize.embedding.weight) == train[-1]["codebook_sha_rank0"]
    card = (out / "README.md").read_text()
    assert "image-tokenizer" in card and str(teacher) in card and "eval_codebook_usage" in card


# ---------------------------------------------------------------------------------------------
# dVAE and PeCo
# ---------------------------------------------------------------------------------------------


def test_dvae_anneals_the_temperature_and_saves_a_decoder(tmp_path):
    out = tmp_path / "dvae"
    # An untrained dVAE's argmax codes crowd onto a few codes: the collapse warning says so, with the numbers,
    # once (then at most every 100 steps).
    with pytest.warns(RuntimeWarning, match=r"Codebook collapse at step 0: .* used only \d+ of 64 codes") as caught:
        main(["--method", "dvae", "--output_dir", str(out), "--max_steps", "4", "--no-do_eval", "--config_overrides",
              "hidden_size=16,decoder_hidden_size=16,decoder_init_size=16,temperature_anneal_steps=4", *QUICK])
    assert sum("Codebook collapse" in str(w.message) for w in caught) == 1
    train, _ = read_log(out)
    temperatures = [r["temperature"] for r in train]
    assert temperatures[0] == pytest.approx(1.0) and temperatures == sorted(temperatures, reverse=True)
    assert temperatures[-1] < temperatures[0]  # driven by the optimiser step, not fixed
    assert all(r["kl_weight"] >= 0 and "reconstruction_loss" in r and "codebook_usage" in r for r in train)
    tokenizer = check_saved_tokenizer(out, "hf_mim_dvae")
    images = tokenizer.decode(torch.zeros(2, 8, 8, dtype=torch.long))
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1
    assert (out / "reconstructions.png").stat().st_size > 1000


def test_peco_with_an_mae_perceptual_network(tmp_path):
    perceptual = save_tiny_mae(tmp_path / "mae")
    out = tmp_path / "peco"
    adversarial = "use_adversarial=True,adversarial_start_step=2,discriminator_hidden_size=8,discriminator_num_layers=2"
    results = main(["--method", "peco", "--perceptual_model", str(perceptual), "--output_dir", str(out),
                    "--max_steps", "4", "--config_overrides", adversarial, *QUICK])
    train, _ = read_log(out)
    for record in train:
        assert record["perceptual_loss"] > 0 and record["pixel_loss"] > 0 and record["codebook_ranks_identical"] == 1
    # The adversarial term from optimiser step 2 on (the records of steps 3 and 4), the discriminator trained.
    assert [r["discriminator_loss"] > 0 for r in train] == [False, False, True, True]
    assert [r["adversarial_lambda"] > 0 for r in train] == [False, False, True, True]
    assert results["eval_perceptual_loss"] > 0 and 0 < results["eval_codebook_usage"] <= 1
    tokenizer = check_saved_tokenizer(out, "hf_mim_peco")
    perceptual_keys = weight_keys(perceptual)
    foreign = ("loss.", "network.", "model.", "discriminator.", "main.")  # perceptual network, discriminator
    assert not any(key.startswith(foreign) for key in weight_keys(out))
    assert not perceptual_keys & weight_keys(out)
    assert tokenizer.config.perceptual_network_name_or_path == str(perceptual)
    assert (out / "reconstructions.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    assert "(ours)" in card and "paper" in card and "peco" in card.lower()


# ---------------------------------------------------------------------------------------------
# Two processes: every process keeps the same codebook, and that is the one saved
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_run_keeps_bit_identical_codebooks(tmp_path):
    teacher = save_tiny_vit(tmp_path / "teacher")
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "--config_file", str(CPU_2PROC), str(SCRIPT),
               "--method", "vqkd", "--teacher", str(teacher), "--output_dir", str(out), "--max_steps", "4",
               "--no-do_eval", *QUICK]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    train, _ = read_log(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["codebook_ranks_identical"] == 1.0 for r in train)
    for record in train:
        assert record["codebook_sha_rank0"] == record["codebook_sha_rank1"]
    assert len({r["codebook_sha_rank0"] for r in train}) == 4  # the codebook did change at every step
    saved = AutoModel.from_pretrained(out).quantize.embedding.weight
    assert codebook_fingerprint(saved) == train[-1]["codebook_sha_rank1"]
    assert json.loads((out / "train_results.json").read_text())["total_batch_size"] == 64  # 32 x 2 processes


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem, error, message", [
    ("grid", ValueError, "teacher_input_size"),  # a patch-8 teacher: 4x4 patches for 8x8 tokens
    ("missing", TeacherLoadError, "--teacher"),
    ("none", ValueError, "--teacher MODEL_ID_OR_DIR"),
    ("not_vision", TeacherLoadError, "vision"),
])
def test_bad_teachers_fail_before_training_and_name_the_fix(tmp_path, problem, error, message):
    teacher = {"grid": lambda: str(save_tiny_vit(tmp_path / "patch8", patch_size=8)),
               "missing": lambda: str(tmp_path / "no-such-teacher"),
               "none": lambda: None,
               "not_vision": lambda: str(save_bert(tmp_path / "bert"))}[problem]()
    argv = ["--method", "vqkd", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *QUICK]
    with pytest.raises(error, match=message):
        main(argv + (["--teacher", teacher] if teacher else []))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_continuing_with_a_teacher_of_another_feature_size_names_the_fix(vqkd_run, tmp_path):
    out, _, _ = vqkd_run  # a tokenizer trained to predict 32-dim features
    narrow = save_tiny_vit(tmp_path / "narrow", hidden_size=16)
    with pytest.raises(ValueError, match="gives 16-dim patch tokens.*teacher_dim=32.*teacher_dim=16"):
        main(["--method", "vqkd", "--model_name_or_path", str(out), "--teacher", str(narrow),
              "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *QUICK])


def save_bert(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(path)
    return path


def test_peco_needs_a_perceptual_network_whose_layers_exist(tmp_path):
    argv = ["--method", "peco", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *QUICK]
    with pytest.raises(ValueError, match="--perceptual_model"):
        main(argv)
    vit = save_tiny_vit(tmp_path / "vit", layers=2)
    with pytest.raises(ValueError, match="perceptual_layers .* 2 blocks"):
        main(argv + ["--perceptual_model", str(vit), "--perceptual_layers", "1", "3"])


def test_nan_features_stop_with_the_step_and_the_way_out(tmp_path):
    path = save_tiny_vit(tmp_path / "nan_teacher")
    from transformers import ViTModel

    broken = ViTModel.from_pretrained(path)
    with torch.no_grad():
        broken.embeddings.patch_embeddings.projection.weight.fill_(float("nan"))
    broken.save_pretrained(path)
    with pytest.raises(FloatingPointError, match=r"stopped at optimiser step 0: .*NaN.*--learning_rate"):
        main(["--method", "vqkd", "--teacher", str(path), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
              "--no-do_eval", *QUICK])


def test_help_lists_each_method_with_its_recipe():
    vqkd = build_parser("vqkd").format_help()
    assert "--teacher" in vqkd and "adam_beta2=0.99" in vqkd and "weight_decay=0.0001" in vqkd
    assert "num_train_epochs=100" in vqkd and "accelerate launch" in vqkd
    peco = build_parser("peco").format_help()
    assert "--perceptual_model PERCEPTUAL_MODEL" in peco and "--teacher TEACHER" not in peco  # each its own options
    assert "--crop_min_scale" in build_parser("dvae").format_help()
