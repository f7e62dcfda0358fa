"""Model cards: Hub metadata, the measured results only, one template per method, clear errors."""

from __future__ import annotations

import fnmatch
import importlib.resources
import tomllib
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_mim.cards import METHODS, NEEDS_TOKENIZER, make_model_card, saved_card_inputs, write_model_card

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = {
    "model_type": "hf_mim_mae", "architectures": ["MaeForPreTraining"], "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "image_size": 32,
    "auto_map": {"AutoConfig": "configuration_mae.MaeConfig", "AutoModel": "modeling_mae.MaeModel",
                 "AutoModelForPreTraining": "modeling_mae.MaeForPreTraining"},
}


def card_for(method: str, **overrides) -> ModelCard:
    kwargs = dict(method=method, model_type=f"hf_mim_{method}", recipe={}, results={}, dataset=None,
                  base_model=None, tokenizer="test-user/tokenizer" if method in NEEDS_TOKENIZER else None,
                  tokenizer_revision="0123abc" if method in NEEDS_TOKENIZER else None, task="pretraining")
    return make_model_card(**{**kwargs, **overrides})


def front_matter(card: ModelCard) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_renders_a_complete_card(method):
    card = card_for(method)
    text = str(card)
    metadata = front_matter(card)
    assert metadata["library_name"] == "transformers"  # the Hub convention for Auto-class (also remote-code) models
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert {"hf_mim", "masked-image-modeling", method} <= set(metadata["tags"])
    assert "model-index" not in metadata  # nothing measured, nothing reported
    assert "{{" not in text and "{%" not in text and "<!--" not in text
    for heading in ("## Method", "## Training recipe", "## Results", "## How to use", "## Limitations",
                    "## Framework versions"):
        assert heading in text
    assert METHODS[method][0].split()[0] in text.split("## Method")[1]  # the method's own paragraph
    assert "No evaluation was run" in text
    assert ModelCard(text).data.library_name == "transformers"  # round-trips through the Hub's parser


def test_measured_results_become_the_model_index_and_nothing_else():
    card = card_for("mae", results={"eval_loss": 0.4321, "masked_accuracy": 0.25}, dataset="uoft-cs/cifar10",
                    eval_split="test", config=TINY_CONFIG, recipe={"learning_rate": 1.5e-4, "mask_ratio": 0.75})
    reloaded = ModelCard(str(card))
    results = {r.metric_type: r for r in reloaded.data.eval_results}
    assert {name: r.metric_value for name, r in results.items()} == {"eval_loss": 0.4321, "masked_accuracy": 0.25}
    assert all(r.dataset_type == "uoft-cs/cifar10" and r.dataset_split == "test" for r in results.values())
    assert reloaded.data.datasets == ["uoft-cs/cifar10"]
    text = str(card)
    assert "| `learning_rate` | `0.00015` |" in text and "| `mask_ratio` | `0.75` |" in text
    assert "| eval_loss | `0.4321` |" in text
    assert "Demonstration model" in text  # 32 wide, 2 deep
    assert 'AutoModelForPreTraining.from_pretrained("<namespace>/hf_mim_mae-mae", trust_remote_code=True)' in text


def test_fine_tuned_card_names_base_model_and_classification_pipeline():
    config = {**TINY_CONFIG, "architectures": ["MaeForImageClassification"], "num_labels": 10, "hidden_size": 768,
              "num_hidden_layers": 12,
              "auto_map": {**TINY_CONFIG["auto_map"],
                           "AutoModelForImageClassification": "modeling_mae.MaeForImageClassification"}}
    card = card_for("mae", task="image-classification", base_model="test-user/mae-base", config=config,
                    results={"accuracy": 0.9}, dataset="uoft-cs/cifar10", repo_id="test-user/mae-ft", revision="v1")
    metadata = front_matter(card)
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["base_model"] == "test-user/mae-base"
    assert metadata["model-index"][0]["name"] == "mae-ft"
    text = str(card)
    assert 'AutoModelForImageClassification.from_pretrained("test-user/mae-ft", revision="v1")' in text
    assert "(10 classes)" in text and "Demonstration model" not in text


def test_remote_code_repos_carry_the_custom_code_tag_and_hub_metric_types():
    card = card_for("mae", task="image-classification", config={**TINY_CONFIG, "num_labels": 3},
                    results={"top1": 0.9, "top5": 1.0}, dataset="uoft-cs/cifar10")
    metadata = front_matter(card)
    assert "custom_code" in metadata["tags"]  # the code ships in the repo (auto_map)
    types = {r.metric_name: r.metric_type for r in ModelCard(str(card)).data.eval_results}
    assert types == {"top1": "accuracy", "top5": "top5"}  # top-1 is the Hub's `accuracy`
    assert "custom_code" not in front_matter(card_for("mae"))["tags"]  # no config, no code to name


def test_segmentation_card_describes_the_backbone_and_reports_mean_iou():
    backbone = {key: value for key, value in TINY_CONFIG.items() if key not in ("architectures", "auto_map")}
    config = {"model_type": "upernet", "architectures": ["UperNetForSemanticSegmentation"], "hidden_size": 64,
              "backbone_config": backbone, "id2label": {"0": "background", "1": "digit"}}
    card = card_for("mae", model_type="upernet", task="semantic-segmentation", config=config,
                    results={"mean_iou": 0.61, "overall_accuracy": 0.93}, dataset="test-user/scenes",
                    repo_id="test-user/seg")
    metadata = front_matter(card)
    assert metadata["pipeline_tag"] == "image-segmentation" and "custom_code" not in metadata["tags"]
    results = {r.metric_name: r for r in ModelCard(str(card)).data.eval_results}
    assert results["mean_iou"].metric_type == "mean_iou" and results["mean_iou"].metric_value == 0.61
    assert results["mean_iou"].task_type == "image-segmentation"
    assert results["mean_iou"].dataset_type == "test-user/scenes"
    text = str(card)
    assert "| `hidden_size` | `32` |" in text and "(2 classes), UperNet" in text  # the backbone's width
    assert 'AutoModelForSemanticSegmentation.from_pretrained("test-user/seg")' in text
    assert "trust_remote_code" not in text and "`import hf_mim`\nregisters the backbone type" in text


def test_local_dataset_and_base_model_stay_out_of_hub_metadata(tmp_path):
    card = card_for("mae", dataset=str(tmp_path), results={"eval_loss": 1.0}, base_model=str(tmp_path),
                    task="image-classification")
    metadata = front_matter(card)
    assert "datasets" not in metadata and "base_model" not in metadata
    assert str(tmp_path) in str(card)  # still said in the body, not dropped


def test_tokenizer_and_peco_honesty():
    text = str(card_for("beit", tokenizer="test-user/dall-e", tokenizer_revision="a" * 40))
    assert f"`test-user/dall-e` at revision `{'a' * 40}`" in text
    assert "not the paper's confirmed settings" in str(card_for("peco"))
    tags = front_matter(card_for("vqkd"))["tags"]
    assert "image-tokenizer" in tags


@pytest.mark.parametrize("overrides, message", [
    ({"method": "simmim"}, "Unknown method"),
    ({"task": "detection"}, "Unknown task"),
    ({"method": "beit", "tokenizer": None, "tokenizer_revision": None}, "tokenizer="),
    ({"method": "dvae", "task": "image-classification"}, "is a tokenizer"),
    ({"tokenizer_revision": "abc"}, "without tokenizer"),
    ({"results": {"accuracy": 0.5}}, "pass dataset="),
    ({"results": {"accuracy": "high"}, "dataset": "d"}, "not a finite number"),
    ({"results": {"accuracy": float("nan")}, "dataset": "d"}, "not a finite number"),
    ({"model_type": "other", "config": TINY_CONFIG}, "the config says"),
])
def test_bad_arguments_are_named(overrides, message):
    overrides = dict(overrides)
    with pytest.raises(ValueError, match=message):
        card_for(overrides.pop("method", "mae"), **overrides)


def test_write_model_card(tmp_path):
    path = write_model_card(tmp_path, method="mae", model_type="hf_mim_mae", recipe={"lr": 1.0}, results={},
                            dataset=None, base_model=None, tokenizer=None, tokenizer_revision=None, task="pretraining")
    assert path == tmp_path / "README.md"
    assert ModelCard.load(path).data.library_name == "transformers"
    assert saved_card_inputs(tmp_path) == {"method": "mae", "task": "pretraining", "recipe": {"lr": 1.0}, "results": {}}


def test_templates_ship_as_package_data():
    """Every template file is matched by pyproject's package-data, so an installed wheel has it."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hf_mim"]
    package = Path(str(importlib.resources.files("hf_mim")))
    templates = [p.relative_to(package).as_posix() for p in (package / "card_templates").rglob("*") if p.is_file()]
    assert {f"card_templates/methods/{m}.md" for m in METHODS} <= set(templates)
    unshipped = [t for t in templates if not any(fnmatch.fnmatch(t, pattern) for pattern in patterns)]
    assert not unshipped


def test_recipe_values_read_as_a_user_wrote_them(tmp_path):
    import json

    import torch
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    recipe = {"optimizer": OptimizerNames.ADAMW_TORCH_FUSED, "lr_scheduler_type": SchedulerType.COSINE,
              "tokenizer_dtype": torch.float16}
    text = str(card_for("mae", recipe=recipe))
    assert "| `optimizer` | `adamw_torch_fused` |" in text and "| `lr_scheduler_type` | `cosine` |" in text
    assert "| `tokenizer_dtype` | `float16` |" in text
    assert "OptimizerNames" not in text and "torch.float16" not in text
    write_model_card(tmp_path, **{**dict(method="mae", model_type="hf_mim_mae", results={}, dataset=None,
                                         base_model=None, tokenizer=None, tokenizer_revision=None,
                                         task="pretraining"), "recipe": recipe})
    assert saved_card_inputs(tmp_path)["recipe"]["optimizer"] == "adamw_torch_fused"
    assert "OptimizerNames" not in json.dumps(saved_card_inputs(tmp_path))


def test_a_segmenter_card_describes_the_segmenter_not_the_pre_training():
    backbone = {**TINY_CONFIG, "decoder_hidden_size": 16, "decoder_num_hidden_layers": 1, "mask_ratio": 0.75,
                "norm_pix_loss": True}
    config = {"model_type": "upernet", "architectures": ["MimUperNetForSemanticSegmentation"],
              "backbone_config": backbone, "id2label": {"0": "background", "1": "ink"},
              "auto_map": {"AutoConfig": "segmenter.MimUperNetConfig",
                           "AutoModelForSemanticSegmentation": "segmenter.MimUperNetForSemanticSegmentation"}}
    text = str(card_for("mae", model_type="upernet", task="semantic-segmentation", config=config))
    for pretraining_field in ("decoder_hidden_size", "mask_ratio", "norm_pix_loss"):
        assert f"| `{pretraining_field}` |" not in text  # no row in the Model table
    assert "reconstructs pixels" not in text  # MAE's pre-training limitation is not the segmenter's
    assert "import hf_mim  # registers hf_mim_mae with the Auto classes" in text  # not "registers upernet"
    assert 'AutoModelForSemanticSegmentation.from_pretrained("<namespace>/upernet-mae", trust_remote_code=True)' in text
    assert "semantic segmentation (2 classes), UperNet" in text
