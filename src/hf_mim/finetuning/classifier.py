"""The classifier to fine-tune: labels read and checked from the data, the model loaded from any
hf_mim checkpoint (pre-training, classification, converted reference weights) or built from a
config, and the input resolution changed with its position tables resized.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import datasets
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel

from ..data import ImageDatasets
from ..models.relative_position import resize_relative_position_bias_table
from ..models.vit_core import grid_size_for, resize_pos_embed, to_2tuple

logger = logging.getLogger(__name__)

# Config changes for fine-tuning, per model type, applied to pre-training checkpoints unless the
# user sets them: BEiT fine-tunes with one relative position table per block, each a copy of the
# shared pre-training table (the model's loader copies it).
FINETUNING_CONFIG = {
    "hf_mim_beit": {"use_shared_relative_position_bias": False, "use_relative_position_bias": True},
}
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


@dataclass
class Labels:
    names: list[str]  # class id -> name

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.names)}


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def label_feature(dataset, column: str, split: str):
    feature = (dataset.features or {}).get(column)
    if isinstance(feature, datasets.ClassLabel):
        return feature
    if isinstance(feature, datasets.Value) and feature.dtype in INTEGER_DTYPES:
        return feature
    raise ValueError(
        f"The label column {column!r} of the {split} split holds {feature!r}, not integer class ids. Encode it "
        f"first (`dataset.class_encode_column({column!r})` turns strings into class ids), or pass the right "
        "column with --label_column_name."
    )


def read_labels(data: ImageDatasets) -> Labels:
    """The classes of the data set, with every split's labels checked to be ids in [0, num_classes)."""
    column = data.label_column
    if column is None:
        reference = data.train if data.train is not None else data.eval
        raise ValueError(
            f"{data.source} has no label column (looked for 'label'; columns: {list(reference.column_names)}). "
            "Pass --label_column_name with the column of class ids."
        )
    names, highest = None, -1
    for split, dataset in (("train", data.train), ("validation", data.eval)):
        if dataset is None:
            continue
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError("Fine-tuning and probing need a map-style data set (no --streaming).")
        feature = label_feature(dataset, column, split)
        if isinstance(feature, datasets.ClassLabel):
            if names is not None and names != feature.names:
                raise ValueError(f"The train and validation splits name their classes differently: {names} vs "
                                 f"{feature.names}. Use one ClassLabel for both.")
            names = feature.names
        values = dataset.unique(column)
        if None in values:
            raise ValueError(f"The {split} split has images without a label (None in {column!r}): filter them out.")
        low, high = min(values), max(values)
        if low < 0:
            raise ValueError(f"The {split} split has label {low} in {column!r} (negative ids mark unlabelled images): "
                             "filter those images out before fine-tuning.")
        if names is not None and high >= len(names):
            raise ValueError(f"The {split} split has label {high} but the ClassLabel names only {len(names)} classes.")
        highest = max(highest, high)
    return Labels(names=list(names) if names is not None else [str(index) for index in range(highest + 1)])


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def is_classifier(config) -> bool:
    return any(name.endswith("ForImageClassification") for name in (config.architectures or []))


def check_image_size(image_size, patch_size, source: str) -> None:
    try:
        grid_size_for(image_size, patch_size)
    except ValueError as error:
        raise ValueError(f"--image_size {image_size} does not fit {source}: {error}") from None


def classification_config(config, labels: Labels, drop_path: float | None, ignore_mismatched_sizes: bool, source: str):
    """The checkpoint's config made ready for fine-tuning on `labels`."""
    changes = {} if is_classifier(config) else dict(FINETUNING_CONFIG.get(config.model_type, {}))
    if drop_path is not None:
        changes["drop_path_rate"] = drop_path
    if is_classifier(config) and config.num_labels != labels.num_labels:
        if not ignore_mismatched_sizes and config.num_labels < labels.num_labels:
            raise ValueError(
                f"{source} classifies {config.num_labels} classes but the data has {labels.num_labels}. Pass "
                "--ignore_mismatched_sizes to replace its head with a new one for these classes."
            )
        if not ignore_mismatched_sizes:
            logger.warning("%s has %d classes, the data only %d: keeping its head (pass --ignore_mismatched_sizes "
                           "for a new %d-class head).", source, config.num_labels, labels.num_labels, labels.num_labels)
            return apply_changes(config, changes)
    changes.update(id2label=labels.id2label, label2id=labels.label2id)
    return apply_changes(config, changes)


def apply_changes(config, changes: dict):
    """A re-validated copy of `config` with `changes` (fine-tuning layouts may need two fields at once)."""
    fields = {**config.to_dict(), **changes}
    for key in ("model_type", "transformers_version"):
        fields.pop(key, None)
    if "id2label" in changes:
        fields.pop("num_labels", None)
    return type(config)(**fields)


def load_classifier(model_name_or_path: str, labels: Labels, *, drop_path=None, ignore_mismatched_sizes=False,
                    image_size=None, **hub_kwargs) -> PreTrainedModel:
    """AutoModelForImageClassification of any hf_mim checkpoint, for these labels and this resolution."""
    config = AutoConfig.from_pretrained(model_name_or_path, **hub_kwargs)
    if image_size is not None:
        check_image_size(image_size, config.patch_size, model_name_or_path)
    config = classification_config(config, labels, drop_path, ignore_mismatched_sizes, model_name_or_path)
    model, info = AutoModelForImageClassification.from_pretrained(
        model_name_or_path, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes,
        output_loading_info=True, **hub_kwargs,
    )
    logger.info("Loaded %s: new (randomly initialised) %s; unused from the checkpoint %s.", model_name_or_path,
                sorted(info["missing_keys"]) or "none", sorted(info["unexpected_keys"]) or "none")
    return change_image_size(model, image_size) if image_size is not None else model


def change_image_size(model: PreTrainedModel, image_size) -> PreTrainedModel:
    """`model` rebuilt for `image_size`, its learned tables resized for the new patch grid.

    A model class may provide `resize_image_size(image_size)` itself; otherwise the state dict is
    copied, with learned absolute position tables (`pos_embed`) resized bicubically and relative
    position tables with BEiT's geometric cubic resize. Fixed sin-cos tables are buffers the model
    regenerates. Any other shape change is an error.
    """
    config = model.config
    check_image_size(image_size, config.patch_size, type(model).__name__)
    if to_2tuple(image_size) == to_2tuple(config.image_size):
        return model
    if callable(getattr(model, "resize_image_size", None)):
        return model.resize_image_size(image_size)
    old_grid = grid_size_for(config.image_size, config.patch_size)
    new_grid = grid_size_for(image_size, config.patch_size)
    new_config = copy.deepcopy(config)
    new_config.image_size = image_size
    parameter = next(model.parameters())
    resized = type(model)(new_config).to(device=parameter.device, dtype=parameter.dtype)
    target = resized.state_dict()
    state = model.state_dict()
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        if key.endswith("relative_position_bias_table"):
            state[key] = resize_relative_position_bias_table(value, old_grid, new_grid)
        elif key.endswith("pos_embed"):
            prefix = value.shape[1] - old_grid[0] * old_grid[1]
            state[key] = resize_pos_embed(value, old_grid, new_grid, num_prefix=prefix)
        else:
            raise ValueError(f"Cannot change the image size of {type(model).__name__}: {key} changes shape from "
                             f"{list(value.shape)} to {list(target[key].shape)} and hf_mim does not know how to resize it.")
    resized.load_state_dict(state, strict=True)
    logger.info("Changed the input resolution from %s (grid %s) to %s (grid %s).", config.image_size, old_grid,
                image_size, new_grid)
    return resized


def build_classifier(config, labels: Labels, drop_path=None, image_size=None) -> PreTrainedModel:
    """A randomly initialised classifier (training from scratch) from a config."""
    changes = {"id2label": labels.id2label, "label2id": labels.label2id}
    if drop_path is not None:
        changes["drop_path_rate"] = drop_path
    if image_size is not None:
        check_image_size(image_size, config.patch_size, "the config")
        changes["image_size"] = image_size
    config = apply_changes(config, changes)
    return AutoModelForImageClassification.from_config(config)


__all__ = ["Labels", "build_classifier", "change_image_size", "load_classifier", "read_labels"]
