"""Model cards for hf_mim checkpoints: Hub metadata through ``huggingface_hub.ModelCard`` and a
Markdown body rendered from the Jinja templates in ``hf_mim/card_templates/`` (shipped as package
data; ``model_cards/README.md`` at the top of the repository explains them).

Only what the caller measured goes into the card: ``results`` become the ``model-index`` and the
Results table, ``recipe`` the hyper-parameter table; nothing is filled in from papers.

```python
from hf_mim.cards import write_model_card
write_model_card("out/mae-tiny", method="mae", model_type="hf_mim_mae", task="pretraining",
                 recipe={"learning_rate": 1.5e-4, "mask_ratio": 0.75}, results={}, dataset=None,
                 base_model=None, tokenizer=None, tokenizer_revision=None)
```
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Set
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)


def card_methods() -> dict[str, tuple[type, str]]:
    """card name -> (method class, kind), read from the method registries (`hf_mim.pretraining.METHODS`,
    `hf_mim.tokenizer_training.TOKENIZER_METHODS`; imported on first use) at every call, so that a method
    registered later (from another package) counts: "mim" methods pre-train an encoder; "tokenizer" methods
    produce the discrete targets other methods predict. Each has a Markdown paragraph in
    card_templates/methods/<name>.md (without one, the card gives its `summary`)."""
    from .pretraining.methods import METHODS as MIM_METHODS
    from .tokenizer_training.methods import TOKENIZER_METHODS

    return {method.card_name or method.name: (method, registry.kind)
            for registry in (MIM_METHODS, TOKENIZER_METHODS) for method in registry.values()}


class CardMethods(Mapping):
    """method -> (human name, kind), as `card_methods` reads them."""

    def __getitem__(self, name: str) -> tuple[str, str]:
        method, kind = card_methods()[name]
        return method.title, kind

    def __iter__(self):
        return iter(card_methods())

    def __len__(self) -> int:
        return len(card_methods())


class NeedsTokenizer(Set):
    """The card methods whose pre-training targets come from a separate tokenizer the card must name."""

    @staticmethod
    def names() -> list[str]:
        return sorted(name for name, (method, _) in card_methods().items() if method.needs_tokenizer)

    def __contains__(self, name) -> bool:
        return name in self.names()

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


METHODS = CardMethods()
NEEDS_TOKENIZER = NeedsTokenizer()
TASKS = ("pretraining", "image-classification", "semantic-segmentation")
PIPELINE_TAGS = {"pretraining": "image-feature-extraction", "image-classification": "image-classification",
                 "semantic-segmentation": "image-segmentation"}
TASK_NAMES = {"pretraining": "Masked image modeling", "image-classification": "Image classification",
              "semantic-segmentation": "Semantic segmentation"}
# Result name -> the metric type the Hub knows (its leaderboards and model-index read these); others keep their name.
HUB_METRIC_TYPES = {"top1": "accuracy", "accuracy": "accuracy", "mean_iou": "mean_iou", "overall_accuracy": "accuracy"}
# The card's inputs, saved beside README.md so a rewrite (publish --refresh_card, another repo id) keeps them.
CARD_INPUTS_FILE = "model_card_inputs.json"
KEPT_CARD_INPUTS = ("method", "task", "recipe", "results", "dataset", "dataset_config", "eval_split", "base_model",
                    "tokenizer", "tokenizer_revision", "license", "from_scratch", "demo")
# Config fields shown in the Model table, when present.
ARCHITECTURE_FIELDS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "decoder_hidden_size", "decoder_num_hidden_layers", "mask_ratio", "norm_pix_loss",
    "vocab_size", "codebook_size", "codebook_dim", "num_labels",
)
# What only the pre-training head used: not part of a fine-tuned classifier or segmenter.
PRETRAINING_ONLY_FIELDS = ("decoder_hidden_size", "decoder_num_hidden_layers", "mask_ratio", "norm_pix_loss",
                           "vocab_size")
# Below this width or depth a model is a demonstration of the pipeline, and the card says so.
DEMO_MIN_HIDDEN_SIZE, DEMO_MIN_LAYERS = 192, 6
FRAMEWORKS = ("hf_mim", "transformers", "torch", "huggingface_hub", "safetensors", "datasets", "accelerate")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id (not an existing local path), else None."""
    return name if name and HUB_ID.match(name) and not os.path.exists(name) else None


def template_text(name: str) -> str:
    """A template shipped in the package (works from a source tree and from an installed wheel)."""
    return importlib.resources.files("hf_mim").joinpath("card_templates", name).read_text(encoding="utf-8")


@functools.cache
def warn_no_method_template(method: str) -> None:
    logger.warning("No model-card text for method %r: its card says only its summary. Write the paragraph and its "
                   "limitations in hf_mim/card_templates/methods/%s.md (see README, 'Adding a method').", method, method)


def method_text(method: str) -> tuple[str, list[str]]:
    """(description paragraph, method-specific limitation bullets) of a method. A method with no template
    in the package (one registered from another package) gets its one-line `summary`, and a warning."""
    try:
        text = template_text(f"methods/{method}.md")
    except FileNotFoundError:
        warn_no_method_template(method)
        entry = card_methods().get(method)
        return (entry[0].summary if entry else ""), []
    description, _, limitations = text.partition("<!-- limitations -->")
    bullets = [line for line in re.split(r"\n(?=- )", limitations.strip()) if line.strip()]
    return description.strip(), bullets


def framework_versions() -> list[tuple[str, str]]:
    versions = []
    for name in FRAMEWORKS:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def format_value(value: Any) -> str:
    """A recipe / result value as one Markdown table cell."""
    value = plain_value(value)
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'").replace("\n", " ") + "`"


def check_results(results: dict) -> dict[str, float]:
    """Metric name -> finite number; anything else is rejected (a card never shows a made-up value)."""
    checked = {}
    for name, value in results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"results[{name!r}] = {value!r} is not a finite number. Pass only measured metrics "
                "(name -> number), e.g. results={'accuracy': 0.91}."
            )
        checked[str(name)] = float(value)
    return checked


def config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a dict or a PreTrainedConfig, got {type(config).__name__}.")


def with_num_labels(config: dict) -> dict:
    """A saved config holds `id2label`, not `num_labels` (a property in transformers 5): add it."""
    if "num_labels" in config or not config.get("id2label"):
        return config
    return {**config, "num_labels": len(config["id2label"])}


def auto_class_for(config: dict, task: str) -> str:
    """The Auto class that loads the saved architecture, read from the config's auto_map."""
    architecture = (config.get("architectures") or [None])[0]
    for auto_class, target in (config.get("auto_map") or {}).items():
        if architecture and isinstance(target, str) and target.endswith("." + architecture):
            return auto_class
    defaults = {"image-classification": "AutoModelForImageClassification",
                "semantic-segmentation": "AutoModelForSemanticSegmentation"}
    return defaults.get(task, "AutoModel")


def is_demo_model(config: dict) -> bool:
    """Smaller than ViT-Tiny (192 wide, 12 deep) in width, or shallower than 6 blocks."""
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    return (hidden is not None and hidden < DEMO_MIN_HIDDEN_SIZE) or (layers is not None and layers < DEMO_MIN_LAYERS)


def architecture_config(config: dict, task: str) -> dict:
    """The config whose fields describe the network: a segmenter's backbone, with the segmenter's classes."""
    if task != "semantic-segmentation" or not isinstance(config.get("backbone_config"), dict):
        return config
    return {**config["backbone_config"], "num_labels": len(config.get("id2label") or {}) or None,
            "architectures": config.get("architectures")}


def check_arguments(method, task, tokenizer, tokenizer_revision, results, dataset) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
    kind = METHODS[method][1]
    if kind == "tokenizer" and task != "pretraining":
        raise ValueError(f"{method} is a tokenizer: use task='pretraining'.")
    if kind == "tokenizer" and tokenizer is not None:
        raise ValueError(f"{method} is itself a tokenizer: leave tokenizer=None (record its teacher in `recipe`).")
    if method in NEEDS_TOKENIZER and task == "pretraining" and tokenizer is None:
        raise ValueError(
            f"{method} pre-training predicts the codes of a tokenizer: pass tokenizer=<Hub id or path> and "
            "tokenizer_revision=<commit> (--tokenizer / --tokenizer_revision on examples/publish.py) so the "
            "card says which targets the model learned."
        )
    if tokenizer_revision is not None and tokenizer is None:
        raise ValueError("tokenizer_revision was given without tokenizer: pass both.")
    if results and not dataset:
        raise ValueError("results were given without the dataset they were measured on: pass dataset=...")


def limitations(method: str, task: str, config: dict, results: dict, dataset: str | None,
                demo: bool | None) -> list[str]:
    items = []
    if demo or (demo is None and is_demo_model(config)):
        items.append(
            f"- **Demonstration model** (hidden size {config.get('hidden_size', '?')}, "
            f"{config.get('num_hidden_layers', '?')} layers): it shows that the pipeline works and is not "
            "meant for real use."
        )
    if task == "pretraining":  # the method's bullets are about its pre-training objective and outputs
        items += method_text(method)[1]
    if not results:
        items.append("- No evaluation was run: nothing is known about this checkpoint's accuracy.")
    if dataset:
        items.append(f"- The model reflects its training data (`{dataset}`) and that data set's licence and biases.")
    return items


def plain_value(value: Any) -> Any:
    """What a reader should see of a recipe value: an enum's value (`adamw_torch_fused`, not
    `OptimizerNames.ADAMW_TORCH_FUSED`), a dtype's name (`float32`, not `torch.float32`)."""
    if isinstance(value, Enum):
        return value.value
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    return value


def card_metadata(ships_code: bool, task: str, method: str, kind: str, model_name: str, license: str,
                  dataset: str | None, dataset_config: str | None, eval_split: str, base_model: str | None,
                  results: dict, extra_tags: list[str] | None) -> ModelCardData:
    """The Hub's YAML block. Its convention for models loaded with transformers' Auto classes, also through
    remote code: library_name transformers (the "Use in Transformers" snippet), `custom_code` when the code
    ships in the repo."""
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[task],
        tags=["hf_mim", "masked-image-modeling", method, *(["custom_code"] if ships_code else []),
              *(["image-tokenizer"] if kind == "tokenizer" else []), *(extra_tags or [])],
        license=license,
        datasets=[hub_id(dataset)] if hub_id(dataset) else None,  # local data sets have no Hub id
        base_model=hub_id(base_model),
        model_name=model_name,
        eval_results=[
            EvalResult(
                task_type=PIPELINE_TAGS[task], task_name=TASK_NAMES[task],
                dataset_type=hub_id(dataset) or dataset, dataset_name=dataset, dataset_config=dataset_config,
                dataset_split=eval_split, metric_type=HUB_METRIC_TYPES.get(metric, metric), metric_name=metric,
                metric_value=value,
            )
            for metric, value in results.items()
        ] or None,
    )


def task_text(task: str, kind: str, name: str, config: dict, from_scratch: bool) -> tuple[str, str]:
    """(the Task row of the model table, the one-paragraph summary under the title)."""
    if task == "semantic-segmentation":
        classes = config.get("num_labels") or "unknown number of"
        if from_scratch:
            return (f"semantic segmentation ({classes} classes), UperNet",
                    f"A UperNet semantic segmenter on a ViT backbone ({name} architecture) trained from scratch.")
        return (f"semantic segmentation ({classes} classes), UperNet",
                f"A UperNet semantic segmenter on a ViT backbone fine-tuned with hf_mim, from a {name}-pre-trained "
                "encoder.")
    if task == "image-classification":
        description = f"image classification ({config.get('num_labels', 'unknown number of')} classes)"
        if from_scratch:  # no pre-trained weights: say so rather than name a pre-training
            return description, f"A ViT ({name} architecture) trained from scratch for image classification with hf_mim."
        return description, f"A ViT fine-tuned for image classification with hf_mim, from a {name}-pre-trained encoder."
    if kind == "tokenizer":
        return ("image tokenizer (discrete visual tokens)",
                f"A {name} trained with hf_mim: it turns images into discrete visual tokens.")
    return ("self-supervised pre-training (feature extraction)",
            f"A ViT encoder pre-trained with {name} (masked image modeling) using hf_mim.")


def architecture_rows(config: dict, task: str) -> list[tuple[str, str]]:
    """The Model table's config fields; a fine-tuned model leaves out what only its pre-training used."""
    shown = [key for key in ARCHITECTURE_FIELDS if key in config]
    if task != "pretraining":
        shown = [key for key in shown if key not in PRETRAINING_ONLY_FIELDS]
    return [(key, format_value(config[key])) for key in shown]


def make_model_card(
    *,
    method: str,
    model_type: str | None,
    recipe: dict,
    results: dict,
    dataset: str | None,
    base_model: str | None,
    tokenizer: str | None,
    tokenizer_revision: str | None,
    task: Literal["pretraining", "image-classification", "semantic-segmentation"],
    license: str = "apache-2.0",
    repo_id: str | None = None,
    revision: str | None = None,
    config: Any = None,
    dataset_config: str | None = None,
    eval_split: str = "validation",
    image_processor: bool = False,
    extra_tags: list[str] | None = None,
    demo: bool | None = None,
    from_scratch: bool = False,
) -> ModelCard:
    """A model card for a checkpoint. `recipe`: hyper-parameters actually used; `results`: metrics
    actually measured (name -> number) on `eval_split` of `dataset`; `config`: the model's config
    (dict or PreTrainedConfig) for the architecture table and the Auto class to load it with;
    `demo`: flag the checkpoint as a demonstration (None: decided from the config's size);
    `from_scratch`: a classifier trained from random weights (no pre-training to name)."""
    check_arguments(method, task, tokenizer, tokenizer_revision, results, dataset)
    config = config_dict(config)
    auto_class = auto_class_for(config, task)
    if task == "image-classification":
        config = with_num_labels(config)
    model_type = model_type or config.get("model_type")
    if not model_type:
        raise ValueError("model_type is unknown: pass model_type=... or config=...")
    if config.get("model_type") not in (None, model_type):
        raise ValueError(f"model_type={model_type!r} but the config says {config['model_type']!r}.")
    results = check_results(results)
    name, kind = METHODS[method]
    repo_id = repo_id or f"<namespace>/{model_type}-{method}"
    model_name = repo_id.rsplit("/", 1)[-1]
    ships_code = bool(config.get("auto_map"))  # the config names the code saved beside it (trust_remote_code)
    card_data = card_metadata(ships_code, task, method, kind, model_name, license, dataset, dataset_config, eval_split,
                              base_model, results, extra_tags)
    network = architecture_config(config, task)  # a segmenter's backbone
    task_description, summary = task_text(task, kind, name, network, from_scratch)
    summary += f" Initialised from `{base_model}`." if base_model else ""
    summary += f" Trained on `{dataset}`." if dataset else ""
    return ModelCard.from_template(
        card_data,
        template_str=template_text("model_card.md"),
        title=model_name,
        summary=summary,
        method_description=method_text(method)[0],
        model_type=model_type,
        registered_type=network.get("model_type") or model_type,  # what `import hf_mim` registers
        architecture=(network.get("architectures") or [None])[0],
        task_description=task_description,
        architecture_rows=architecture_rows(network, task),
        base_model=base_model,
        base_model_link=f"https://huggingface.co/{base_model}" if hub_id(base_model) else None,
        tokenizer=tokenizer,
        tokenizer_revision=tokenizer_revision,
        dataset=dataset,
        dataset_config=dataset_config,
        recipe_rows=[(key, format_value(value)) for key, value in recipe.items()],
        result_rows=[(metric, format_value(value)) for metric, value in results.items()],
        results_where=f"the `{eval_split}` split of `{dataset}`",
        auto_class=auto_class,
        # without a config to read, the snippet assumes what every hf_mim save does: the code ships
        remote_code=ships_code or not config,
        # Features from a pre-training checkpoint; a fine-tuned encoder may lack parts AutoModel expects.
        encoder_class="AutoModel" if task == "pretraining" and "AutoModel" in (config.get("auto_map") or {}) else None,
        repo_id=repo_id,
        revision_argument=f', revision="{revision}"' if revision else "",
        image_processor=image_processor,
        limitations=limitations(method, task, network, results, dataset, demo),
        framework_versions=framework_versions(),
    )


def write_model_card(output_dir: str | os.PathLike, **card_kwargs) -> Path:
    """Render the card (same keyword arguments as `make_model_card`) to `output_dir/README.md`, and
    its run-specific inputs (recipe, results, data ...) to `CARD_INPUTS_FILE` beside it."""
    path = Path(output_dir) / "README.md"
    make_model_card(**card_kwargs).save(path)
    kept = {key: card_kwargs[key] for key in KEPT_CARD_INPUTS if card_kwargs.get(key) is not None}
    if "recipe" in kept:
        kept["recipe"] = {key: plain_value(value) for key, value in kept["recipe"].items()}
    (Path(output_dir) / CARD_INPUTS_FILE).write_text(json.dumps(kept, indent=2, default=str) + "\n")
    return path


def saved_card_inputs(model_dir: str | os.PathLike) -> dict:
    """The inputs the last `write_model_card` recorded for this directory ({} when none)."""
    path = Path(model_dir) / CARD_INPUTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


__all__ = ["CARD_INPUTS_FILE", "METHODS", "make_model_card", "saved_card_inputs", "write_model_card"]
