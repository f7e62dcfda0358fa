"""`examples/pretrain.py` (MAE) end to end on the embedded digits: outputs, learning, exact resume,
crash-safe checkpoints, two real gloo processes under `accelerate launch`, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForPreTraining

import hf_mim
from hf_mim.data import ImageDatasets
from hf_mim.pretraining import main
from hf_mim.training.checkpoints import (
    STATE_FILE, TrainerState, latest_checkpoint, prune_checkpoints, publish_checkpoint, remove_incomplete_checkpoints,
    resolve_resume_path,
)
from hf_mim.training.model_choice import BASE_MIN_IMAGES, choose_preset
from hf_mim.training.tracking import LOG_FILE, read_log

ROOT = Path(__file__).resolve().parents[1]
# 96 training images in batches of 16: 6 micro-batches per epoch.
FAST = ["--max_train_samples", "96", "--max_eval_samples", "32", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def losses(output_dir: Path) -> dict[int, float]:
    return read_log(str(output_dir / LOG_FILE), "loss")


# ---------------------------------------------------------------------------------------------
# A short run: what it leaves behind, and that it learns
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("pretrain") / "mae"
    results = main([
        "--output_dir", str(output_dir), "--max_steps", "60", "--max_train_samples", "640",
        "--per_device_train_batch_size", "32", "--max_eval_samples", "64", "--eval_on_start",
        "--eval_steps", "30", "--checkpointing_steps", "30", "--logging_steps", "10", "--report_to", "none",
        "--dataloader_num_workers", "0",
    ])
    return output_dir, results


def test_run_writes_a_loadable_model_processor_card_and_figure(learned_run):
    output_dir, results = learned_run
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "reconstructions.png",
                 "all_results.json", "train_results.json", "eval_results.json", LOG_FILE):
        assert (output_dir / name).is_file(), name
    assert [path.name for path in sorted(output_dir.glob("checkpoint-*"))] == ["checkpoint-30", "checkpoint-60"]
    model = AutoModelForPreTraining.from_pretrained(output_dir)
    assert type(model) is hf_mim.MaeForPreTraining and model.config.image_size == 32
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert processor.size == {"height": 32, "width": 32}
    written = read_json(output_dir / "all_results.json")
    assert written["train_steps"] == 60 and written["total_batch_size"] == 32
    assert written["eval_loss"] == pytest.approx(results["eval_loss"])
    card = (output_dir / "README.md").read_text()
    assert "library_name: transformers" in card and f"{results['eval_loss']:.4f}"[:5] in card


def test_held_out_masked_patch_loss_falls(learned_run):
    output_dir, results = learned_run
    eval_loss = read_log(str(output_dir / LOG_FILE), "eval_loss")
    assert sorted(eval_loss) == [0, 30, 60]
    # The untrained model's masked-patch MSE on normalised pixels is ~4.3; after 60 steps of 32
    # images the model has learned the digits' strokes and gets about half of it (2.2 at step 40
    # of an 80-step run here, 0.6 after the full demo).
    assert eval_loss[60] < 0.6 * eval_loss[0], eval_loss
    assert eval_loss[60] < eval_loss[30] < eval_loss[0]
    train_loss = losses(output_dir)
    assert train_loss[60] < 0.8 * train_loss[10], train_loss


def test_reconstruction_figure_is_an_image(learned_run):
    from PIL import Image

    output_dir, _ = learned_run
    with Image.open(output_dir / "reconstructions.png") as figure:
        width, height = figure.size
    assert width > 200 and height > 200


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


def resume_args(output_dir: Path) -> list[str]:
    # drop path on: the model's own randomness must be restored as well as the data order's.
    return ["--output_dir", str(output_dir), "--max_steps", "9", "--checkpointing_steps", "4",
            "--save_total_limit", "0", "--config_overrides", "drop_path_rate=0.2", "--no-do_eval", *FAST]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    main(resume_args(output_dir))
    return output_dir


@pytest.mark.parametrize("step", [4, 8], ids=["inside-epoch-0", "inside-epoch-1"])
def test_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path, step):
    """What an interrupted run leaves: its checkpoint-<step>, and the half-written folder of the next
    save. Re-running the same command continues from the checkpoint to the same losses and weights."""
    assert sorted(p.name for p in uninterrupted.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8",
                                                                         "checkpoint-9"]
    resumed = tmp_path / "run"
    shutil.copytree(uninterrupted / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    crashed_save = resumed / f".tmp-checkpoint-{step + 1}"
    crashed_save.mkdir()
    (crashed_save / "model.safetensors").write_bytes(b"truncated")
    main(resume_args(resumed))
    assert not crashed_save.exists()
    expected, got = losses(uninterrupted), losses(resumed)
    assert sorted(got) == list(range(step + 1, 10))
    for k in got:
        assert got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-7), (k, got[k], expected[k])
    ours, theirs = load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    state = TrainerState.from_file(resumed / "checkpoint-9" / STATE_FILE)
    assert (state.global_step, state.epoch, state.batch_in_epoch) == (9, 1, 3)


def test_a_complete_run_is_not_repeated(uninterrupted, tmp_path):
    """Re-running the command of a finished run resumes at its final checkpoint and trains no step."""
    again = tmp_path / "again"
    shutil.copytree(uninterrupted / "checkpoint-9", again / "checkpoint-9")
    results = main(resume_args(again))
    assert results["train_steps"] == 9 and losses(again) == {}


def test_resume_none_starts_afresh(uninterrupted, tmp_path):
    fresh = tmp_path / "fresh"
    shutil.copytree(uninterrupted / "checkpoint-8", fresh / "checkpoint-8")
    main([*resume_args(fresh), "--max_steps", "2", "--resume_from_checkpoint", "none"])
    assert sorted(losses(fresh)) == [1, 2]
    assert losses(fresh)[1] == pytest.approx(losses(uninterrupted)[1], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Crash-safe checkpoint folders
# ---------------------------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(TrainerState(global_step=step).to_json())
    return folder


def test_latest_checkpoint_ignores_incomplete_folders(tmp_path):
    fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoint-12").mkdir()  # no trainer_state.json: never published
    (tmp_path / ".tmp-checkpoint-15").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"  # 10 > 3 numerically, 12 incomplete
    assert resolve_resume_path("latest", str(tmp_path), auto_resume=False).name == "checkpoint-10"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume_path(str(tmp_path / "checkpoint-12"), str(tmp_path), auto_resume=True)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        resolve_resume_path("latest", str(tmp_path / "empty"), auto_resume=False)
    remove_incomplete_checkpoints(tmp_path)
    assert not (tmp_path / ".tmp-checkpoint-15").exists()


def test_interrupted_replacement_keeps_the_complete_copy(tmp_path):
    """A crash between the two renames of a re-save leaves only `checkpoint-N.old`: it is restored."""
    old = fake_checkpoint(tmp_path, 6)
    os.rename(old, tmp_path / "checkpoint-6.old")
    remove_incomplete_checkpoints(tmp_path)
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"


def test_publish_replaces_a_checkpoint_of_the_same_step(tmp_path):
    fake_checkpoint(tmp_path, 5)
    temp = tmp_path / ".tmp-checkpoint-5"
    temp.mkdir()
    (temp / "weights").write_text("new")
    publish_checkpoint(temp, tmp_path / "checkpoint-5", TrainerState(global_step=5, epoch=2))
    assert (tmp_path / "checkpoint-5" / "weights").read_text() == "new"
    assert TrainerState.from_file(tmp_path / "checkpoint-5" / STATE_FILE).epoch == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_prune_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]


# ---------------------------------------------------------------------------------------------
# Two real gloo processes under `accelerate launch`
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_run(tmp_path):
    output_dir = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
        str(ROOT / "examples" / "pretrain.py"), "--output_dir", str(output_dir), "--max_steps", "4",
        "--checkpointing_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "20",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--logging_steps", "1",
        "--report_to", "none", "--dataloader_num_workers", "0",
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    assert "8 per device x 2 processes" in finished.stderr
    results = read_json(output_dir / "all_results.json")
    assert results["total_batch_size"] == 16 and results["train_steps"] == 4
    # Every eval image counted once: accelerate's padding duplicates (20 is not a multiple of 2 x 8) are dropped.
    assert results["eval_samples"] == 20
    checkpoint = output_dir / "checkpoint-4"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert TrainerState.from_file(checkpoint / STATE_FILE).num_processes == 2
    model = AutoModelForPreTraining.from_pretrained(output_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem and the fix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--mask_ratio", "1.0"], ValueError, r"mask_ratio"),
        (["--config_overrides", "num_channels=2"], ValueError, r"only 1 \(grey\) and 3 \(RGB\)"),
        (["--image_size", "30"], ValueError, r"divisible"),
        (["--config_overrides", "hiden_size=64"], ValueError, r"Unknown config fields \['hiden_size'\]"),
        (["--push_to_hub"], ValueError, r"--push_to_hub needs --hub_model_id"),
        (["--image_column_name", "pixels"], ValueError, r"--image_column_name 'pixels' is not a column"),
        (["--max_train_samples", "10", "--per_device_train_batch_size", "64"], ValueError, r"smaller than one batch"),
        (["--bf16", "--fp16"], ValueError, r"Conflicting precision options"),
    ],
    ids=["mask-ratio", "channels", "image-size", "config-field", "push-without-repo", "column", "tiny-data",
         "precision"],
)
def test_bad_input(tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        main(["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none",
              "--dataloader_num_workers", "0", *extra])


def test_unknown_method():
    with pytest.raises(ValueError, match=r"Unknown --method 'simmim'; available: \["):
        main(["--method", "simmim"])


# ---------------------------------------------------------------------------------------------
# --push_to_hub at the end of a run, to the local Hub-protocol server
# ---------------------------------------------------------------------------------------------


def test_push_to_hub_at_the_end(local_hub, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download

    repo_id = f"{local_hub.user}/mae-pushed"
    output_dir = tmp_path / "pushed"
    results = main(["--output_dir", str(output_dir), "--max_steps", "2", "--checkpointing_steps", "1",
                    "--push_to_hub", "--hub_model_id", repo_id, *FAST])
    files = {path.relative_to(snapshot_download(repo_id)).as_posix()
             for path in Path(snapshot_download(repo_id)).rglob("*") if path.is_file()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= files
    assert not any(name.startswith(("checkpoint-", ".tmp-checkpoint")) for name in files)  # local state stays local
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    measured = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert measured["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-4)  # the model-index holds what ran
    model = AutoModelForPreTraining.from_pretrained(repo_id)
    assert type(model) is hf_mim.MaeForPreTraining and results["train_steps"] == 2


# ---------------------------------------------------------------------------------------------
# Recipe defaults, learning rate and schedule
# ---------------------------------------------------------------------------------------------


def test_recipe_defaults_and_explicit_values():
    from hf_mim.pretraining import parse_args

    mae = parse_args(["--train_dir", "data"])
    assert (mae.base_learning_rate, mae.adam_beta2, mae.weight_decay, mae.lr_scheduler_type) == (1.5e-4, 0.95, 0.05,
                                                                                                  "cosine")
    beit = parse_args(["--method", "beit", "--tokenizer", "tok", "--train_dir", "data"])
    assert (beit.adam_beta2, beit.max_grad_norm, beit.lr_scheduler_type, beit.lr_scheduler_kwargs) == (
        0.999, 3.0, "cosine_with_min_lr", {"min_lr": 1e-5})  # BEiT: per-step cosine down to 1e-5
    own = parse_args(["--method", "beit", "--tokenizer", "tok", "--lr_scheduler_type", "linear", "--adam_beta2", "0.98"])
    assert (own.lr_scheduler_type, own.lr_scheduler_kwargs, own.adam_beta2) == ("linear", None, 0.98)
    with pytest.warns(FutureWarning, match="--warmup_ratio is deprecated"):
        assert parse_args(["--warmup_ratio", "0.1"]).warmup_steps == 0.1


def test_learning_rate_rule_and_schedule():
    from hf_mim.training.optimization import build_scheduler, resolve_learning_rate, resolve_warmup_steps

    assert resolve_learning_rate(None, 1.5e-4, 4096) == pytest.approx(2.4e-3)  # blr * batch / 256
    assert resolve_learning_rate(1e-3, 1.5e-4, 4096) == 1e-3  # an explicit lr wins (unlike run_mae.py)
    assert (resolve_warmup_steps(0.05, 1000), resolve_warmup_steps(40, 1000)) == (50, 40)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = build_scheduler(optimizer, "cosine_with_min_lr", 10, 110, {"min_lr": 1e-5})
    rates = []
    for _ in range(110):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[10] == pytest.approx(1.0) and rates[5] == pytest.approx(0.5)
    assert rates[60] == pytest.approx(1e-5 + (1 - 1e-5) * 0.5, rel=1e-6)  # half-way down the cosine
    assert rates[-1] == pytest.approx(1e-5 + (1 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 99 / 100)), rel=1e-6)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-5) and min(rates[10:]) >= 1e-5  # ends at the floor


# ---------------------------------------------------------------------------------------------
# The model of a run without --config_name: chosen from the data, and said
# ---------------------------------------------------------------------------------------------


def image_datasets(side: int, count: int) -> ImageDatasets:
    from PIL import Image

    one = datasets.Dataset.from_dict({"image": [Image.new("RGB", (side, side), (90, 120, 200))]})
    return ImageDatasets(train=one.select([0] * count), eval=None, image_column="image", label_column=None,
                         source="folder", eval_split=None)


@pytest.mark.parametrize(("side", "count", "preset"), [(32, 50, "mae-demo"), (64, 10, "mae-demo"),
                                                        (224, BASE_MIN_IMAGES, "mae-base")])
def test_preset_follows_the_data(side, count, preset):
    chosen, why = choose_preset("mae", image_datasets(side, count))
    assert chosen == preset and f"{side}x{side} px images ({count:,})" in why


@pytest.mark.parametrize(("side", "count"), [(224, 500), (96, BASE_MIN_IMAGES)])
def test_data_that_fits_no_preset_is_refused_with_both_choices(side, count):
    with pytest.raises(ValueError, match=rf"{side}x{side} px images.*--config_name mae-base.*--config_name mae-demo"):
        choose_preset("mae", image_datasets(side, count))


def test_the_start_of_run_line_names_the_chosen_model(tmp_path, capfd):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(24):
        Image.new("RGB", (32, 32), (index * 10, 100, 200 - index * 5)).save(folder / f"{index}.png")
    main(["--train_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
          "--per_device_train_batch_size", "8", "--no-do_eval", "--report_to", "none",
          "--dataloader_num_workers", "0", "--checkpointing_steps", "no"])
    log = capfd.readouterr().err.splitlines()
    start = next(line for line in log if "Training mae" in line)  # the loop's log
    assert "model: mae-demo (chosen from the data: 32x32 px images (20) are small)" in start, start  # 24 - 15% held out
    # ... after the recipe in force: from scratch on 20 images, the data-size rule's learning rate, lr = 6e-3 * 8 / 256
    recipe = next(line for line in log if "Recipe in force" in line)
    assert "data-size rule: 20 training images < 50,000, from scratch: base_learning_rate=0.006" in recipe, recipe
    assert "paper: " in recipe and "adam_beta2=0.95" in recipe and "lr 0.000188 (blr 0.006 x batch/256)" in start
    assert AutoModelForPreTraining.from_pretrained(tmp_path / "out").config.image_size == 32


# ---------------------------------------------------------------------------------------------
# Options flow one way: parsed once, never rewritten
# ---------------------------------------------------------------------------------------------


def test_options_are_parsed_once_and_a_run_leaves_them_as_they_were(tmp_path):
    import copy

    from hf_mim.pretraining import get_method, parse_args
    from hf_mim.training import run_training

    options = parse_args(["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--max_train_samples", "32",
                          "--per_device_train_batch_size", "16", "--report_to", "none", "--checkpointing_steps", "no"])
    with pytest.raises(AttributeError, match=r"read-only once parsed: make new ones with \.replace\(do_eval=\.\.\.\)"):
        options.do_eval = False
    assert options.replace(seed=7).seed == 7 and options.seed == 42  # a new object; the parsed one stands
    before = copy.deepcopy(vars(options))
    assert before["dataloader_num_workers"] is None and before["do_eval"] is None  # the run decides both
    run_training(options, get_method("mae"))
    assert vars(options) == before  # nothing inside was changed in place either (lists, dicts)
    start = next(json.loads(line) for line in (tmp_path / "out" / LOG_FILE).read_text().splitlines()
                 if '"event": "start"' in line)
    decided = start["config"]  # the options, and what the run decided: workers for this machine, evaluation
    assert decided["dataloader_num_workers"] >= 0 and decided["do_eval"] is True
    assert decided["base_learning_rate"] == 6e-3  # the recipe as completed by the data-size rule (the digits demo)
    assert "recipe_inputs" not in decided  # the recipe's values are there; not the object they came from


def test_what_the_command_line_gets_wrong_is_said_before_any_data_is_read(tmp_path):
    from hf_mim.pretraining import parse_args

    missing = tmp_path / "not-there"  # parsing alone raises: no data is looked for
    with pytest.raises(ValueError, match=r"--method beit predicts the codes of a frozen image tokenizer: pass --tokenizer"):
        parse_args(["--method", "beit", "--train_dir", str(missing)])
    twice = parse_args(["--method", "vit_mpp", "--method", "mae", "--train_dir", str(missing)])  # argparse: the last
    assert twice.method == "mae" and (twice.base_learning_rate, twice.adam_beta2) == (1.5e-4, 0.95)  # MAE's recipe
