"""Semantic segmentation (`examples/segment.py`): digit scenes, mean IoU, UperNet fine-tuning runs."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from hf_mim import MaeConfig
from hf_mim.metrics import load_mean_iou
from hf_mim.segmentation.data import (
    DIGIT_SCENE_LABELS, SegmentationExamples, check_mask_values, load_segmentation_data,
    make_digit_scenes,
)
from hf_mim.segmentation.loss import balanced_class_weights, weighted_cross_entropy
from hf_mim.segmentation.run import main

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TINY_BACKBONE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                     patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                     decoder_intermediate_size=32)
QUICK = ["--dataloader_num_workers", "0", "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
         "--decoder_channels", "16", "--auxiliary_channels", "8", "--per_device_train_batch_size", "16",
         "--logging_steps", "1000", "--eval_strategy", "no"]


def test_digit_scenes_are_deterministic_and_label_each_digit_with_its_class():
    first, again = make_digit_scenes(6, seed=3), make_digit_scenes(6, seed=3)
    assert first["image"][0].tobytes() == again["image"][0].tobytes()
    masks = [np.asarray(mask) for mask in first["mask"]]
    assert all(mask.shape == (32, 32) for mask in masks)
    values = set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist())
    assert 0 in values and values <= set(range(len(DIGIT_SCENE_LABELS))) and len(values) > 2
    image = np.asarray(first["image"][0], dtype=np.float64)
    digit, background = masks[0] > 0, masks[0] == 0
    # the digit's pixels differ from the background around them (the colour is chosen to contrast)
    assert np.abs(image[digit].mean(axis=0) - image[background].mean(axis=0)).max() > 20


def test_ink_labels_mark_every_digit_with_one_class_on_the_same_images():
    digits, ink = make_digit_scenes(4, seed=5), make_digit_scenes(4, seed=5, labels="ink")
    for by_digit, by_ink, image in zip(digits["mask"], ink["mask"], ink["image"]):
        by_digit, by_ink = np.asarray(by_digit), np.asarray(by_ink)
        np.testing.assert_array_equal(by_ink, (by_digit > 0).astype(np.uint8))
    assert [a.tobytes() for a in digits["image"]] == [b.tobytes() for b in ink["image"]]
    with pytest.raises(ValueError, match="choose one of"):
        make_digit_scenes(1, labels="colours")


def test_mean_iou_matches_scikit_learns_jaccard():
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    references = [rng.integers(0, 4, (8, 8)) for _ in range(3)]
    predictions = [np.where(rng.random((8, 8)) < 0.6, ref, rng.integers(0, 4, (8, 8))) for ref in references]
    references[0][0, :4] = 255  # unlabelled pixels are left out
    result = load_mean_iou().compute(predictions=predictions, references=references, num_labels=4, ignore_index=255)
    labelled = np.concatenate([r.ravel() for r in references]) != 255
    truth = np.concatenate([r.ravel() for r in references])[labelled]
    predicted = np.concatenate([p.ravel() for p in predictions])[labelled]
    expected = jaccard_score(truth, predicted, labels=[0, 1, 2, 3], average=None)
    np.testing.assert_allclose(result["per_category_iou"], expected)
    assert result["mean_iou"] == pytest.approx(expected.mean())
    assert result["overall_accuracy"] == pytest.approx((truth == predicted).mean())


def test_a_16_bit_grey_image_keeps_its_grey_levels():
    """PIL's convert("RGB") clips 16-bit grey to white; the examples scale it from its bit depth."""
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mode I;16, half the range
    dataset = datasets.Dataset.from_dict({"image": [grey16], "mask": [Image.fromarray(np.zeros((8, 8), np.uint8))]})
    example = SegmentationExamples(dataset, "image", "mask", 8, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], train=False)[0]
    torch.testing.assert_close(example["pixel_values"], torch.full((3, 8, 8), 128 / 255), atol=1e-6, rtol=0)


def test_mask_values_beyond_the_classes_name_the_ignore_index():
    dataset = datasets.Dataset.from_dict(
        {"mask": [Image.fromarray(np.array([[0, 1], [7, 255]], dtype=np.uint8), mode="L")]},
        features=datasets.Features({"mask": datasets.Image()}),
    )
    check_mask_values(dataset, "mask", num_labels=8, ignore_index=255, split="train")  # 255 is the ignore index
    with pytest.raises(ValueError, match=r"up to 7.*--num_labels 8.*--ignore_index 7"):
        check_mask_values(dataset, "mask", num_labels=5, ignore_index=255, split="train")


def test_folders_of_images_and_masks_load(tmp_path):
    scenes = make_digit_scenes(4, seed=0)
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for index, row in enumerate(scenes):
        row["image"].save(tmp_path / "images" / f"{index}.jpg")
        row["mask"].save(tmp_path / "masks" / f"{index}.png")
    data = load_segmentation_data(train_dir=str(tmp_path), train_val_split=0.5)
    assert (data.image_column, data.mask_column) == ("image", "mask") and len(data.train) == len(data.eval) == 2
    (tmp_path / "images" / "extra.jpg").write_bytes((tmp_path / "images" / "0.jpg").read_bytes())
    with pytest.raises(ValueError, match="have no mask of the same name"):
        load_segmentation_data(train_dir=str(tmp_path))


@pytest.fixture(scope="module")
def tiny_backbone_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mae-config")
    MaeConfig(**TINY_BACKBONE).save_pretrained(folder)
    return folder


def test_a_short_run_improves_mean_iou_and_writes_a_card_with_it(tiny_backbone_config, tmp_path):
    output_dir = tmp_path / "run"
    metrics = main(QUICK + ["--config_name", str(tiny_backbone_config), "--num_scenes", "160", "--num_train_epochs",
                            "4", "--learning_rate", "2e-3", "--scene_labels", "digits",
                            "--output_dir", str(output_dir)])
    assert metrics["eval_mean_iou"] > metrics["start_eval_mean_iou"] + 0.03
    saved = json.loads((output_dir / "eval_results.json").read_text())
    assert saved["eval_mean_iou"] == metrics["eval_mean_iou"] and "start_eval_mean_iou" in saved
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.pipeline_tag == "image-segmentation"
    card_results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert card_results["mean_iou"] == metrics["eval_mean_iou"]
    assert card_results["iou_digit_7"] == metrics["eval_iou_digit_7"]  # each class's IoU too
    assert "digits labels" in card.text and "| `balance_classes` | `True` |" in card.text
    assert "| `layer_decay` | `0.65` |" in card.text and "digit scenes" in card.text
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(output_dir).eval()
    assert type(reloaded.backbone).__name__ == "MaeBackbone" and reloaded.config.num_labels == 11
    with torch.no_grad():
        assert reloaded(torch.randn(1, 3, 32, 32)).logits.shape == (1, 11, 32, 32)
    # the evaluation transform is saved too: the folder gives what the run evaluated on
    processor = AutoImageProcessor.from_pretrained(output_dir)
    scene = make_digit_scenes(1, seed=9)
    expected = SegmentationExamples(scene, "image", "mask", 32, processor.image_mean, processor.image_std,
                                    train=False)[0]["pixel_values"]
    torch.testing.assert_close(processor(scene[0]["image"], return_tensors="pt")["pixel_values"][0], expected,
                               atol=1e-5, rtol=0)
    # like every saved model: checksums of its files (hf_mim.verify), and the run's lock released at the end
    from hf_mim.verify import check_folder

    assert check_folder(output_dir)[0] == "ok" and "model.safetensors" in (output_dir / "checksums.json").read_text()
    assert not (output_dir / ".hf_mim.lock").exists()


def test_a_short_run_finds_the_digits(tiny_backbone_config, tmp_path):
    """The default task (ink: background / any digit) with the demo's class-balanced loss. Without the
    balance this run ended at digit IoU 0 on 4 of 4 seeds (every digit pixel at background); with it,
    0.39-0.41."""
    metrics = main(QUICK + ["--config_name", str(tiny_backbone_config), "--num_scenes", "160",
                            "--per_device_train_batch_size", "8", "--num_train_epochs", "8", "--learning_rate", "3e-3",
                            "--output_dir", str(tmp_path / "run")])
    assert metrics["eval_iou_background"] > 0.8  # each class's IoU is reported
    assert metrics["eval_iou_digit"] > 0.25  # the digits are found, not background everywhere
    assert metrics["eval_mean_iou"] > metrics["start_eval_mean_iou"] + 0.3


def test_balanced_weights_are_inverse_square_root_frequencies_with_mean_one():
    counts = np.array([900, 100, 0])
    weights = balanced_class_weights(counts).double()
    frequency = np.maximum(counts, 1) / np.maximum(counts, 1).sum()
    assert float(weights[0] / weights[1]) == pytest.approx(np.sqrt(100 / 900))
    assert float(weights[2] / weights[1]) == pytest.approx(np.sqrt(100 / 1))  # absent: counted as one pixel
    assert float((weights.numpy() * frequency).sum()) == pytest.approx(1.0)  # a pixel's mean weight


def test_the_mask_check_counts_each_class_leaving_out_the_ignore_index():
    masks = [np.array([[0, 1], [1, 255]], dtype=np.uint8), np.array([[2, 2], [0, 0]], dtype=np.uint8)]
    dataset = datasets.Dataset.from_dict({"mask": [Image.fromarray(m, mode="L") for m in masks]},
                                         features=datasets.Features({"mask": datasets.Image()}))
    np.testing.assert_array_equal(check_mask_values(dataset, "mask", 3, 255, "train"), [3, 2, 2])


def test_balanced_loss_with_equal_weights_is_upernets_own_loss(tiny_backbone_config, tmp_path):
    """The trainer's loss (main + auxiliary logits caught by a hook) against UperNet's forward: with
    every weight 1 they are the same cross-entropy, ignore index and auxiliary weight included."""
    from hf_mim.segmentation.loss import SegmentationTrainer
    from hf_mim.segmentation.run import SegmentationArguments, build_segmenter, parse_segmentation_args

    torch.manual_seed(0)
    args = SegmentationArguments(config_name=str(tiny_backbone_config), decoder_channels=8, auxiliary_channels=4)
    model = build_segmenter(args, {0: "background", 1: "a", 2: "b"}, ignore_index=255).eval()
    _, training_args = parse_segmentation_args(QUICK + ["--output_dir", str(tmp_path)])
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.randint(0, 3, (2, 32, 32))}
    inputs["labels"][0, :5] = 255
    trainer = SegmentationTrainer(model=model, args=training_args, class_weights=torch.ones(3))
    with torch.no_grad():
        expected = model(**inputs).loss
        loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    torch.testing.assert_close(loss, expected)
    assert outputs.logits.shape == (2, 3, 32, 32) and model.config.auxiliary_loss_weight == 0.4
    # unequal weights: the weighted mean that torch's cross_entropy defines, on the main logits alone
    weights = torch.tensor([0.5, 2.0, 1.0])
    logits, labels = outputs.logits, inputs["labels"]
    labelled = labels != 255
    per_pixel = -logits.log_softmax(1).gather(1, labels.clamp(max=2)[:, None])[:, 0]  # [B, H, W]
    pixel_weights = weights[labels.clamp(max=2)] * labelled
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, weights, 255),
                               (per_pixel * pixel_weights).sum() / pixel_weights.sum())


def test_masks_with_more_classes_than_given_fail_before_training(tiny_backbone_config, tmp_path):
    scenes = make_digit_scenes(8, seed=0)
    scenes.to_parquet(tmp_path / "scenes.parquet")
    with pytest.raises(ValueError, match=r"outside the class ids \[0, 5\).*Pass --num_labels \d+ .*--ignore_index"):
        main(QUICK + ["--config_name", str(tiny_backbone_config), "--train_file", str(tmp_path / "scenes.parquet"),
                      "--num_labels", "5", "--output_dir", str(tmp_path / "run")])


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="open (issue 10): at CPU scale an MAE-pre-trained backbone does not beat a random one on "
                   "the default (ink) task: measured 2026-12-03 with benchmarks/segmentation_transfer.py, the "
                   "pre-trained start ends 0.02-0.04 mean IoU lower on average in every variant (RESULTS.md)")
def test_a_pretrained_backbone_beats_a_random_one(tiny_backbone_config, tmp_path):
    from hf_mim.pretraining import main as pretrain

    unlabelled = make_digit_scenes(640, seed=101).remove_columns("mask")  # other scenes than the segmentation run's
    unlabelled.to_parquet(tmp_path / "scenes.parquet")
    # The digits demo's base LR: MAE's own (1.5e-4 x 32 / 256 = 1.9e-5) would leave the encoder at its init.
    pretrain(["--train_file", str(tmp_path / "scenes.parquet"), "--config_name", str(tiny_backbone_config),
              "--output_dir", str(tmp_path / "mae"), "--max_steps", "150", "--per_device_train_batch_size", "32",
              "--base_learning_rate", "6e-3", "--max_eval_samples", "32", "--checkpointing_steps", "1000",
              "--report_to", "none", "--dataloader_num_workers", "0"])
    segment = QUICK + ["--num_scenes", "160", "--per_device_train_batch_size", "8", "--num_train_epochs", "8",
                       "--learning_rate", "3e-3"]
    pretrained = main(segment + ["--model_name_or_path", str(tmp_path / "mae"), "--output_dir", str(tmp_path / "a")])
    scratch = main(segment + ["--config_name", str(tiny_backbone_config), "--output_dir", str(tmp_path / "b")])
    assert pretrained["eval_mean_iou"] > scratch["eval_mean_iou"] + 0.02


LOAD_SEGMENTER_WITHOUT_HF_MIM = """
import sys
sys.modules["hf_mim"] = None  # any `import hf_mim` now raises ImportError
import torch
from transformers import AutoConfig, AutoModelForSemanticSegmentation

folder, pixels_path, out_path = sys.argv[1:]
pixels = torch.load(pixels_path)
model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(pixels).logits
# what transformers' run_semantic_segmentation.py does with a model: its config with new labels, then a
# training step of the Trainer's kind (loss from `labels`)
id2label = {0: "sky", 1: "road", 2: "car"}
config = AutoConfig.from_pretrained(folder, id2label=id2label, label2id={v: k for k, v in id2label.items()},
                                    trust_remote_code=True)
relabelled = AutoModelForSemanticSegmentation.from_pretrained(folder, config=config, trust_remote_code=True,
                                                              ignore_mismatched_sizes=True)
loss = relabelled(pixels, labels=torch.randint(0, 3, (2, 32, 32))).loss
loss.backward()
torch.save({"logits": logits, "relabelled_classes": relabelled.config.num_labels, "loss": loss.item(), "class": type(model).__module__ + "." + type(model).__name__,
            "backbone": type(model.backbone).__module__,
            "hf_mim_imported": any(name.startswith("hf_mim.") for name in sys.modules)}, out_path)
"""


def test_import_hf_mim_leaves_transformers_upernet_as_it_is():
    """The segmenter ships its own classes; `import hf_mim` registers only hf_mim's model types, so every other
    UperNet (a ConvNeXt backbone, say) still loads as transformers' own, with its own image processor."""
    from transformers import CONFIG_MAPPING, UperNetConfig
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    import hf_mim  # noqa: F401
    from hf_mim.models.segmenter import MimUperNetConfig

    assert CONFIG_MAPPING["upernet"] is UperNetConfig
    assert MimUperNetConfig not in IMAGE_PROCESSOR_MAPPING._extra_content


@pytest.mark.parametrize("family", ["mae", "beit"])
def test_a_saved_segmenter_loads_without_hf_mim(family, tmp_path):
    """AutoModelForSemanticSegmentation(trust_remote_code=True) where hf_mim cannot be imported: transformers'
    UperNetConfig alone fails on the backbone's model type (KeyError 'hf_mim_mae')."""
    import os
    import subprocess
    import sys

    from model_testing import randomize

    from hf_mim import BEiTConfig
    from hf_mim.segmentation.run import build_segmenter, parse_segmentation_args

    config = MaeConfig(**TINY_BACKBONE) if family == "mae" else BEiTConfig(**TINY_BACKBONE, vocab_size=16)
    config.save_pretrained(tmp_path / "config")
    args, _ = parse_segmentation_args(QUICK + ["--config_name", str(tmp_path / "config"),
                                               "--output_dir", str(tmp_path / "unused")])
    model = randomize(build_segmenter(args, {0: "background", 1: "ink"}, ignore_index=255), seed=3).eval()
    model.save_pretrained(tmp_path / "segmenter")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, tmp_path / "pixels.pt")
    (tmp_path / "elsewhere").mkdir()
    script = tmp_path / "elsewhere" / "load.py"
    script.write_text(LOAD_SEGMENTER_WITHOUT_HF_MIM)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "segmenter"), str(tmp_path / "pixels.pt"),
                             str(tmp_path / "out.pt")], cwd=script.parent, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt")
    assert not remote["hf_mim_imported"]
    assert remote["relabelled_classes"] == 3 and 0 < remote["loss"] < float("inf")
    assert remote["class"].startswith("transformers_modules.") and remote["backbone"].startswith("transformers_modules.")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(pixels).logits, atol=1e-6, rtol=0)
    # with hf_mim installed, transformers' own UperNet class loads the folder
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "segmenter").eval()
    assert type(reloaded).__name__ == "UperNetForSemanticSegmentation"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model(pixels).logits, atol=1e-6, rtol=0)
