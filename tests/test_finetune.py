"""Fine-tuning (`examples/finetune.py` -> `hf_mim.finetuning.run`): classification heads loaded from
pre-training checkpoints, resolution change, a real Trainer run on the digits, the push to a real
(local) Hub, and the errors of bad input.

Everything is tiny (32 px digits, 8 px patches, 32-64 wide, 2 blocks) and runs on the CPU with one
thread: on busy shared cores, torch's default of one thread per core is many times slower.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from mae_testing import perturb_parameters_
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from hf_mim import (
    BEiTConfig, BEiTForImageClassification, BEiTForMaskedImageModeling, MaeConfig, MaeForImageClassification,
    MaeForPreTraining, VitMppConfig, VitMppForImageClassification, VitMppForPreTraining,
)
from hf_mim.data import load_digits_dataset
from hf_mim.finetuning import run
from hf_mim.finetuning.classifier import Labels, load_classifier
from hf_mim.models.relative_position import resize_relative_position_bias_table
from hf_mim.models.vit_core import resize_pos_embed, sincos_2d_table
from hf_mim.redaction import host_names, redact_text

ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
MAE_DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                   decoder_intermediate_size=32)
THREE_CLASSES = Labels(names=["a", "b", "c"])
BEIT_TABLE = "relative_position_bias_table"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def save(model, folder: Path) -> Path:
    torch.manual_seed(1)
    perturb_parameters_(model)  # every tensor away from its init value, so a wrong copy shows
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Classification heads from pre-training checkpoints
# ---------------------------------------------------------------------------------------------

def mae_pretraining():
    return MaeForPreTraining(MaeConfig(**ENCODER, **MAE_DECODER))


def beit_pretraining(v2: bool):
    extra = dict(use_cls_pretext_head=True, cls_head_early_layer=1, cls_head_depth=1) if v2 else {}
    return BEiTForMaskedImageModeling(BEiTConfig(**ENCODER, vocab_size=16, **extra))


def vit_mpp_pretraining():
    return VitMppForPreTraining(VitMppConfig(**ENCODER))


HEAD = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
PER_BLOCK = dict(use_shared_relative_position_bias=False, use_relative_position_bias=True)
# name -> (pre-training model, classifier, classifier config changes, checkpoint keys left unused
# that the loading report must name, prefixes of checkpoint keys unused by design (the class's
# _keys_to_ignore_on_load_unexpected), checkpoint keys copied elsewhere).
LOADING_CASES = {
    "mae": (mae_pretraining, MaeForImageClassification, {},
            {"encoder.norm.weight", "encoder.norm.bias"}, ("decoder.",), set()),
    "beit": (lambda: beit_pretraining(v2=False), BEiTForImageClassification, PER_BLOCK,
             {"beit.norm.weight", "beit.norm.bias"}, ("lm_head.", "beit.mask_token"),
             {f"beit.rel_pos_bias.{BEIT_TABLE}"}),
    "beit_v2": (lambda: beit_pretraining(v2=True), BEiTForImageClassification, PER_BLOCK,
                {"beit.norm.weight", "beit.norm.bias"}, ("lm_head.", "beit.mask_token", "cls_pt_layers."),
                {f"beit.rel_pos_bias.{BEIT_TABLE}"}),
    "vit_mpp": (vit_mpp_pretraining, VitMppForImageClassification, {},
                {"vit.norm.weight", "vit.norm.bias"}, ("mpp_head.", "vit.mask_token"), set()),
}


@pytest.mark.parametrize("name", sorted(LOADING_CASES))
def test_classifier_loads_a_pretraining_checkpoint_with_exactly_the_expected_keys(name, tmp_path):
    build, classifier_class, changes, reported_unused, unused_by_design, copied = LOADING_CASES[name]
    folder = save(build(), tmp_path / name)
    saved = load_file(folder / "model.safetensors")

    model, info = classifier_class.from_pretrained(folder, num_labels=3, output_loading_info=True, **changes)
    assert set(info["missing_keys"]) == HEAD
    assert set(info["unexpected_keys"]) == reported_unused
    assert not info["mismatched_keys"] and not info["error_msgs"]

    # Full accounting of the checkpoint: every key is loaded, reported unused, unused by design, or copied.
    state = model.state_dict()
    by_design = {key for key in saved if key.startswith(unused_by_design)}
    assert by_design, f"the {name} checkpoint should hold keys starting with {unused_by_design}"
    assert set(saved) - set(state) == reported_unused | by_design | copied
    # Not in the checkpoint besides the head: BEiT's per-block tables (copied) and MAE's trained position
    # table, which starts from the sin-cos table the pre-training model regenerates (checked below).
    assert set(state) - set(saved) - HEAD <= {key for key in state if key.endswith(BEIT_TABLE)} | {"encoder.pos_embed"}
    if name == "mae":
        torch.testing.assert_close(state["encoder.pos_embed"][0], sincos_2d_table((4, 4), ENCODER["hidden_size"]))
    for key in set(saved) & set(state):
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0, msg=key)
    if copied:  # BEiT: the shared pre-training table went into every block's own table
        tables = [key for key in state if key.endswith(BEIT_TABLE)]
        assert tables == [f"beit.blocks.{i}.rel_pos_bias.{BEIT_TABLE}" for i in range(ENCODER["num_hidden_layers"])]
        for key in tables:
            torch.testing.assert_close(state[key], saved[f"beit.rel_pos_bias.{BEIT_TABLE}"], rtol=0, atol=0)
    # The fine-tuning head: mean of the patch tokens (no final norm, no CLS) -> fc_norm -> Linear.
    model.eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.base_model(images).last_hidden_state  # [B, 1+N, D]
        expected = model.head(model.fc_norm(tokens[:, 1:].mean(dim=1)))
        torch.testing.assert_close(model(images).logits, expected)
    assert model.base_model.norm is None


def test_load_classifier_gives_beit_per_block_tables_and_drop_path(tmp_path):
    """The fine-tuning path (`load_classifier`): BEiT's per-block layout, the new drop path, the labels."""
    folder = save(beit_pretraining(v2=True), tmp_path / "beit")
    model = load_classifier(str(folder), THREE_CLASSES, drop_path=0.2)
    assert isinstance(model, BEiTForImageClassification)
    assert model.config.use_relative_position_bias and not model.config.use_shared_relative_position_bias
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.num_labels == 3
    assert [block.drop_path.rate for block in model.beit.blocks] == pytest.approx([0.0, 0.2])
    shared = load_file(folder / "model.safetensors")[f"beit.rel_pos_bias.{BEIT_TABLE}"]
    for block in model.beit.blocks:
        torch.testing.assert_close(block.rel_pos_bias.relative_position_bias_table.detach(), shared, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Resolution change
# ---------------------------------------------------------------------------------------------

def test_mae_resolution_change_keeps_every_weight(tmp_path):
    folder = save(mae_pretraining(), tmp_path / "mae")
    torch.manual_seed(0)  # the same new head in both
    at_32 = load_classifier(str(folder), THREE_CLASSES).eval()
    torch.manual_seed(0)
    at_48 = load_classifier(str(folder), THREE_CLASSES, image_size=48).eval()
    assert at_48.config.image_size == 48 and at_48.encoder.grid_size == (6, 6)
    assert at_48.encoder.pos_embed.shape == (1, 1 + 36, ENCODER["hidden_size"])
    state_32, state_48 = at_32.state_dict(), at_48.state_dict()
    assert set(state_32) == set(state_48)
    for key in set(state_32) - {"encoder.pos_embed"}:
        torch.testing.assert_close(state_48[key], state_32[key], rtol=0, atol=0, msg=key)
    # Fine-tuning trains the table, which starts from the sin-cos one of the pre-training grid, resized
    # bicubically for the new grid (the reference's interpolate_pos_embed).
    torch.testing.assert_close(state_32["encoder.pos_embed"][0], sincos_2d_table((4, 4), ENCODER["hidden_size"]))
    torch.testing.assert_close(state_48["encoder.pos_embed"], resize_pos_embed(state_32["encoder.pos_embed"], 4, 6))


def test_beit_resolution_change_resizes_the_relative_tables(tmp_path):
    folder = save(beit_pretraining(v2=False), tmp_path / "beit")
    shared = load_file(folder / "model.safetensors")[f"beit.rel_pos_bias.{BEIT_TABLE}"]  # 4x4 grid: 7*7 + 3 rows
    model = load_classifier(str(folder), THREE_CLASSES, image_size=48).eval()
    assert model.config.image_size == 48
    for block in model.beit.blocks:
        table = block.rel_pos_bias.relative_position_bias_table.detach()
        assert table.shape == (11 * 11 + 3, ENCODER["num_attention_heads"])  # 6x6 grid
        torch.testing.assert_close(table, resize_relative_position_bias_table(shared, (4, 4), (6, 6)))
        torch.testing.assert_close(table[-3:], shared[-3:], rtol=0, atol=0)  # the CLS rows are carried over
        # Offset (0, 0), the centre of the offset grid, maps onto itself.
        torch.testing.assert_close(table[5 * 11 + 5], shared[3 * 7 + 3], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(table[:-3], torch.zeros_like(table[:-3]))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).logits.shape == (2, 3)


def test_vit_mpp_resolution_change_resizes_the_learned_position_table(tmp_path):
    pretraining = vit_mpp_pretraining()
    with torch.no_grad():  # a table whose resize is known: constant over the grid, distinct CLS row
        pretraining.vit.pos_embed[:, 1:] = 0.5
        pretraining.vit.pos_embed[:, 0] = -1.0
    pretraining.save_pretrained(tmp_path / "mpp")
    model = load_classifier(str(tmp_path / "mpp"), THREE_CLASSES, image_size=48)
    table = model.vit.pos_embed.detach()
    assert table.shape == (1, 1 + 36, ENCODER["hidden_size"])
    torch.testing.assert_close(table[:, 0], torch.full((1, ENCODER["hidden_size"]), -1.0))
    torch.testing.assert_close(table[:, 1:], torch.full((1, 36, ENCODER["hidden_size"]), 0.5))


# ---------------------------------------------------------------------------------------------
# The command line on digits (parquet files)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> dict[str, Path]:
    """train (500) / validation (100) parquet files of the embedded digits, and broken variants."""
    folder = tmp_path_factory.mktemp("digits")
    splits = load_digits_dataset().train_test_split(test_size=0.2, seed=0)
    files = {"train": folder / "train.parquet", "validation": folder / "validation.parquet"}
    splits["train"].select(range(500)).to_parquet(files["train"])
    splits["test"].select(range(100)).to_parquet(files["validation"])
    small = splits["train"].select(range(40))
    files["no_label"] = folder / "no_label.parquet"
    small.remove_columns("label").to_parquet(files["no_label"])
    files["text_label"] = folder / "text_label.parquet"
    small.cast_column("label", datasets.Value("string")).to_parquet(files["text_label"])
    return files


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory) -> Path:
    """A (randomly initialised) MAE pre-training checkpoint, 64 wide, as examples/pretrain.py saves it."""
    torch.manual_seed(0)
    model = MaeForPreTraining(MaeConfig(**{**ENCODER, "hidden_size": 64, "num_attention_heads": 4,
                                           "intermediate_size": 128}, **MAE_DECODER))
    folder = tmp_path_factory.mktemp("mae-pretrained")
    model.save_pretrained(folder)
    return folder


QUICK = ["--dataloader_num_workers", "0", "--disable_tqdm", "true", "--report_to", "none",
         "--resume_from_checkpoint", "none", "--save_strategy", "no", "--per_device_train_batch_size", "32",
         "--per_device_eval_batch_size", "100"]


def finetune_args(digits_files, checkpoint, output_dir, *extra) -> list[str]:
    return ["--model_name_or_path", str(checkpoint), "--train_file", str(digits_files["train"]),
            "--validation_file", str(digits_files["validation"]), "--output_dir", str(output_dir), *QUICK, *extra]


def top1_of_saved_model(output_dir: Path, validation_file: Path) -> float:
    """Accuracy of the saved model with the saved image processor, recomputed from scratch."""
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    data = datasets.load_dataset("parquet", data_files=str(validation_file))["train"]
    pixels = processor([image.convert("RGB") for image in data["image"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predictions = model(pixel_values=pixels).logits.argmax(-1)
    return float((predictions == torch.tensor(data["label"])).float().mean())


def test_finetuning_on_digits_learns_and_saves_what_it_measured(digits_files, mae_checkpoint, tmp_path):
    output_dir = tmp_path / "run"
    metrics = run.main(finetune_args(
        digits_files, mae_checkpoint, output_dir, "--max_steps", "40", "--learning_rate", "5e-3",
        "--warmup_steps", "4", "--eval_strategy", "steps", "--eval_steps", "40", "--eval_on_start", "true",
        "--logging_steps", "5", "--drop_path", "0", "--aa", "none", "--reprob", "0", "--hflip", "0",
        "--crop_min_scale", "1.0"))

    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_top1" in entry]
    before, after = evaluations[0]["eval_top1"], metrics["eval_top1"]
    assert evaluations[0]["step"] == 0
    assert after >= before + 0.12 and after >= 0.25, (before, after)  # 10 classes: chance is 0.1
    assert metrics["eval_top5"] >= after
    # Progress as Trainer users expect: loss, lr and grad norm every --logging_steps, then the summary.
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(5, 41, 5))
    assert all({"learning_rate", "grad_norm"} <= set(entry) for entry in logged)
    for name in ("train_results.json", "eval_results.json", "all_results.json"):
        assert (output_dir / name).is_file()
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_top1"] == after

    # The saved model and image processor reproduce the measured accuracy.
    assert top1_of_saved_model(output_dir, digits_files["validation"]) == pytest.approx(after, abs=1e-6)
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results == {"top1": after, "top5": metrics["eval_top5"]}
    assert [result.metric_type for result in card.data.eval_results] == ["accuracy", "top5"]  # top-1: the Hub's type
    assert "| `layer_decay` | `0.75` |" in card.text and "| `smoothing` | `0.1` |" in card.text
    assert "image classification (10 classes)" in card.text and "| `num_labels` | `10` |" in card.text


def test_the_start_of_a_run_prints_the_recipe_in_force(digits_files, tmp_path, capfd):
    """From scratch on 500 images: the data-size rule's values, the user's over them, the paper's for the rest,
    each with its origin, in the log line; and the values reach the model and the optimizer."""
    output_dir = tmp_path / "scratch"
    run.main(["--config_name", "mae-demo", "--train_file", str(digits_files["train"]), "--validation_file",
              str(digits_files["validation"]), "--output_dir", str(output_dir), *QUICK, "--max_steps", "1",
              "--drop_path", "0.05", "--max_eval_samples", "10"])
    log = capfd.readouterr().out.splitlines()
    line = next(line for line in log if "Recipe in force" in line)
    assert ("data-size rule: 500 training images < 50,000, from scratch: base_learning_rate=0.004, layer_decay=1, "
            "aa=none, reprob=0") in line
    assert "paper: smoothing=0.1, mixup=0, cutmix=0, crop_min_scale=0.08" in line
    assert "user: drop_path=0.05" in line and "per_device_train_batch_size=32" in line.split("user: ")[1]
    assert any("learning rate 0.0005 = blr 0.004 * total batch 32 / 256" in entry for entry in log)
    assert AutoConfig.from_pretrained(output_dir).drop_path_rate == 0.05


def test_finetune_push_to_hub_publishes_through_hf_mim(local_hub, digits_files, mae_checkpoint, tmp_path):
    """Two steps with the whole recipe on (48 px, MixUp + CutMix, RandAugment, random erasing),
    then --push_to_hub: one hf_mim.hub.publish commit with weights, processor, code and card."""
    output_dir, repo_id = tmp_path / "pushed", f"{local_hub.user}/mae-digits-finetuned"
    metrics = run.main(finetune_args(
        digits_files, mae_checkpoint, output_dir, "--max_steps", "2", "--image_size", "48", "--mixup", "0.8",
        "--cutmix", "1.0", "--aa", "rand-m9-n2", "--reprob", "0.25", "--max_eval_samples", "20",
        "--push_to_hub", "--hub_model_id", repo_id))
    repo = local_hub.server.repo(repo_id)
    files = set(repo.files(repo.resolve("main")))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_mae.py",
            "vit_core.py"} <= files
    assert not any(name.startswith(("checkpoint-", "optimizer", "scheduler", "rng_state")) for name in files)
    # One upload, by hf_mim.hub.publish (the Trainer's own push is off), after the repository's creation.
    messages = [repo.read_commit(sha)["message"] for sha in repo.history()]
    assert messages == ["hf_mim image-classification fine-tuning", "initial commit"]

    card = ModelCard.load(repo_id)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {
        "top1": metrics["eval_top1"], "top5": metrics["eval_top5"]}
    # The local card, less its local paths (the base model's folder): see hf_mim.redaction.
    pushed_card = (Path(snapshot_download(repo_id)) / "README.md").read_text()
    assert pushed_card == redact_text((output_dir / "README.md").read_text(), host_names())
    assert str(mae_checkpoint) in (output_dir / "README.md").read_text() and str(mae_checkpoint) not in pushed_card

    pushed = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    local = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert pushed.config.image_size == 48 and AutoImageProcessor.from_pretrained(repo_id).crop_size["height"] == 48
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(pushed(images).logits, local(images).logits, rtol=0, atol=0)


def test_a_published_models_checksums_match_the_uploaded_files(local_hub, tmp_path):
    """The upload is a redacted copy (hf_mim.redaction): a config.json naming a local folder is uploaded with
    the folder's name only, and the uploaded checksums.json must describe that copy, not the local files."""
    from hf_mim.checksums import write_model_manifest
    from hf_mim.hub import publish
    from hf_mim.verify import main as verify

    model_dir = save(mae_pretraining(), tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "teacher_name_or_path": str(tmp_path / "teacher")}))
    write_model_manifest(model_dir)
    repo_id = f"{local_hub.user}/redacted-checksums"
    publish(model_dir, repo_id)
    snapshot = Path(snapshot_download(repo_id))
    uploaded = json.loads((snapshot / "config.json").read_text())["teacher_name_or_path"]
    assert uploaded == "teacher" and str(tmp_path) in (model_dir / "config.json").read_text()  # redacted copy only
    assert verify([str(snapshot)]) == 0 and verify([str(model_dir)]) == 0


@pytest.fixture
def hub_datasets(local_hub, monkeypatch):
    """`local_hub` for `datasets` too, which reads its endpoint into `datasets.config` at import."""
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", local_hub.endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL",
                        local_hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return local_hub


def test_finetuning_from_a_hub_dataset_and_an_image_folder(hub_datasets, digits_files, mae_checkpoint, tmp_path):
    """The two other data sources: a Hub data set id (on the local Hub) and class sub-folders."""
    from huggingface_hub import HfApi

    repo_id, api = f"{hub_datasets.user}/digits-parquet", HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    for split in ("train", "validation"):
        api.upload_file(path_or_fileobj=digits_files[split], path_in_repo=f"data/{split}.parquet", repo_id=repo_id,
                        repo_type="dataset")
    args = [*QUICK, "--model_name_or_path", str(mae_checkpoint), "--max_steps", "1", "--max_eval_samples", "20"]
    metrics = run.main([*args, "--dataset_name", repo_id, "--cache_dir", str(tmp_path / "cache"),
                        "--output_dir", str(tmp_path / "hub")])
    assert 0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 1
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.datasets == [repo_id]  # a Hub data set is named in the metadata
    assert card.data.eval_results[0].dataset_split == "validation"

    data = datasets.load_dataset("parquet", data_files=str(digits_files["validation"]))["train"].select(range(30))
    for split, rows in (("train", range(20)), ("val", range(20, 30))):
        for index in rows:
            folder = tmp_path / "folders" / split / f"digit_{data[index]['label']}"
            folder.mkdir(parents=True, exist_ok=True)
            data[index]["image"].save(folder / f"{index}.png")
    metrics = run.main([*args, "--train_dir", str(tmp_path / "folders" / "train"),
                        "--validation_dir", str(tmp_path / "folders" / "val"), "--output_dir", str(tmp_path / "dirs")])
    assert 0 <= metrics["eval_top1"] <= 1
    config = json.loads((tmp_path / "dirs" / "config.json").read_text())
    assert set(config["id2label"].values()) <= {f"digit_{d}" for d in range(10)}  # class names from the folders


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors that name the fix, before any training
# ---------------------------------------------------------------------------------------------

def test_missing_label_column_is_clear(digits_files, mae_checkpoint, tmp_path):
    args = finetune_args(digits_files, mae_checkpoint, tmp_path, "--max_steps", "1")
    args[args.index("--train_file") + 1] = str(digits_files["no_label"])
    args[args.index("--validation_file") + 1] = str(digits_files["no_label"])
    with pytest.raises(ValueError, match="no label column.*--label_column_name"):
        run.main(args)
    with pytest.raises(ValueError, match="--label_column_name 'class' is not a column"):
        run.main([*args, "--label_column_name", "class"])


def test_non_integer_labels_are_clear(digits_files, mae_checkpoint, tmp_path):
    args = finetune_args(digits_files, mae_checkpoint, tmp_path, "--max_steps", "1")
    args[args.index("--train_file") + 1] = str(digits_files["text_label"])
    args[args.index("--validation_file") + 1] = str(digits_files["text_label"])
    with pytest.raises(ValueError, match=r"not integer class ids.*class_encode_column\('label'\)"):
        run.main(args)


def test_a_head_with_fewer_classes_than_the_data_is_clear(digits_files, tmp_path):
    three_class = MaeForImageClassification(MaeConfig(**ENCODER, num_labels=3))
    three_class.save_pretrained(tmp_path / "three")
    args = finetune_args(digits_files, tmp_path / "three", tmp_path / "out", "--max_steps", "1")
    with pytest.raises(ValueError, match="classifies 3 classes but the data has 10.*--ignore_mismatched_sizes"):
        run.main(args)
    ten = load_classifier(str(tmp_path / "three"), Labels([str(d) for d in range(10)]), ignore_mismatched_sizes=True)
    assert ten.head.out_features == 10 and ten.config.num_labels == 10


def test_image_size_the_checkpoint_cannot_take_is_clear(digits_files, mae_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--image_size 44 does not fit.*not divisible by the patch size 8x8.*40x40"):
        run.main(finetune_args(digits_files, mae_checkpoint, tmp_path, "--max_steps", "1", "--image_size", "44"))


def test_push_without_repo_id_or_token_fails_before_training(local_hub, digits_files, mae_checkpoint, tmp_path,
                                                             monkeypatch):
    output_dir = tmp_path / "out"
    args = finetune_args(digits_files, mae_checkpoint, output_dir, "--max_steps", "1", "--push_to_hub")
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id NAMESPACE/NAME"):
        run.main(args)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="no Hugging Face token.*HF_TOKEN.*hf auth login.*--hub_token"):
        run.main([*args, "--hub_model_id", f"{local_hub.user}/never-pushed"])
    assert not (output_dir / "model.safetensors").exists()  # nothing was trained


# ---------------------------------------------------------------------------------------------
# Recipe pieces: soft targets (MixUp / CutMix / label smoothing), command-line names
# ---------------------------------------------------------------------------------------------

def test_label_smoothing_alone_gives_exact_soft_targets():
    from hf_mim.finetuning import SoftTargets

    pixels, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    mixed, targets = SoftTargets(3, smoothing=0.3)(pixels, labels)
    assert mixed is pixels
    expected = torch.full((4, 3), 0.1)
    expected[torch.arange(4), labels] = 0.8  # (1 - 0.3) + 0.3 / 3
    torch.testing.assert_close(targets, expected)
    with pytest.raises(ValueError, match="integer class ids"):
        SoftTargets(3, smoothing=0.1)(pixels, targets)
    with pytest.raises(ValueError, match="--mixup is the Beta"):
        SoftTargets(3, mixup_alpha=-1.0)


def one_hot(labels: torch.Tensor, num_classes: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).float()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_weights_pixels_and_targets_alike(kind):
    """Each image is mixed with the batch rolled by one; the target weight of its own class equals
    the weight of its own pixels (MixUp: the blend factor, CutMix: the area it keeps)."""
    from hf_mim.finetuning import SoftTargets

    torch.manual_seed(0)
    pixels = torch.rand(4, 3, 16, 16) + torch.arange(4).view(4, 1, 1, 1) * 10  # images told apart by value
    labels = torch.tensor([0, 1, 2, 3])
    soft = SoftTargets(4, **({"mixup_alpha": 1.0} if kind == "mixup" else {"cutmix_alpha": 1.0}), smoothing=0.0)
    mixed, targets = soft(pixels, labels)
    partner = pixels.roll(1, dims=0)
    keep = targets[torch.arange(4), labels]  # [B] weight of the image's own class
    torch.testing.assert_close(targets, keep[:, None] * one_hot(labels) + (1 - keep[:, None]) * one_hot(labels.roll(1)))
    if kind == "mixup":
        torch.testing.assert_close(mixed, keep.view(4, 1, 1, 1) * pixels + (1 - keep.view(4, 1, 1, 1)) * partner)
    else:
        own = (mixed == pixels).all(dim=1).float().mean(dim=(1, 2))  # fraction of pixels kept
        torch.testing.assert_close(own, keep)
        assert torch.equal(mixed, torch.where(mixed == pixels, pixels, partner))


def test_command_line_takes_the_names_users_know():
    from hf_mim.finetuning.arguments import parse_finetuning_args

    with pytest.warns(FutureWarning, match="--warmup_ratio is deprecated"):
        _, _, finetuning, training = parse_finetuning_args([
            "--max_train_steps", "7", "--warmup_ratio", "0.2", "--blr", "2e-3", "--layer_decay", "0.65",
            "--drop_path", "0.2", "--smoothing", "0.05", "--mixup", "0.8", "--cutmix", "1.0", "--output_dir", "x"])
    assert (training.max_steps, training.warmup_steps) == (7, 0.2)
    assert training.save_strategy == "epoch"  # the fine-tuning default
    assert (finetuning.base_learning_rate, finetuning.layer_decay, finetuning.drop_path) == (2e-3, 0.65, 0.2)
    assert (finetuning.smoothing, finetuning.mixup, finetuning.cutmix) == (0.05, 0.8, 1.0)
    assert training.remove_unused_columns is False and training.report_to in ([], "none", ["none"])
    run.set_learning_rate(training, finetuning)
    assert training.learning_rate == pytest.approx(2e-3 * 64 / 256)  # blr x total batch / 256
    _, _, finetuning, training = parse_finetuning_args(["--learning_rate", "1e-4", "--output_dir", "x",
                                                        "--checkpointing_steps", "25"])
    assert (training.save_strategy, training.save_steps) == ("steps", 25)
    run.set_learning_rate(training, finetuning)
    assert training.learning_rate == 1e-4  # an explicit lr wins over the default blr
    with pytest.raises(ValueError, match="either --learning_rate .* or --base_learning_rate"):
        parse_finetuning_args(["--learning_rate", "1e-4", "--blr", "1e-3"])


def test_help_shows_the_defaults_of_a_run_on_your_data(capsys):
    from hf_mim.finetuning.arguments import parse_finetuning_args

    with pytest.raises(SystemExit):
        parse_finetuning_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # help lines are wrapped
    small = "from scratch on < 50,000 images"  # the data-size rule
    assert f"(digits demo: none; {small}: none) (default: rand-m9-mstd0.5-inc1)" in text  # not the demo's "none"
    assert f"(digits demo: 0.0; {small}: 0.0) (default: 0.25)" in text  # --reprob
    assert f"(from scratch on the digits: 1.0; {small}: 1.0) (default: 0.75)" in text  # --layer_decay
    assert "(digits demo: 5.0; from scratch on the digits: 15.0) (default: 50.0)" in text  # --num_train_epochs


def test_the_digits_demo_is_short_and_your_data_gets_the_recipe():
    """The README's `finetune.py --model_name_or_path outputs/pretrain-mae` runs minutes, not the recipe's 50 epochs."""
    from hf_mim.finetuning.arguments import DEFAULT_BASE_LEARNING_RATE, parse_finetuning_args

    runs = {"digits demo": ["--model_name_or_path", "ckpt"],
            "your data": ["--model_name_or_path", "ckpt", "--train_dir", "data/train"],
            "from scratch": []}
    settings = {}
    for name, argv in runs.items():
        _, _, finetuning, training = parse_finetuning_args(argv + ["--output_dir", "x"])
        settings[name] = (training.num_train_epochs, finetuning.base_learning_rate, finetuning.layer_decay)
    assert settings == {"digits demo": (5.0, 8e-3, 0.75), "your data": (50.0, DEFAULT_BASE_LEARNING_RATE, 0.75),
                        "from scratch": (15.0, 4e-3, 1.0)}
    _, _, finetuning, training = parse_finetuning_args(runs["digits demo"] + ["--num_train_epochs", "2", "--blr",
                                                                             "1e-3", "--output_dir", "x"])
    assert (training.num_train_epochs, finetuning.base_learning_rate) == (2.0, 1e-3)  # given values win
