"""Semantic-segmentation fine-tuning (`examples/segment.py`): transformers' UperNet on an hf_mim
backbone (`modeling_backbone.py`, BEiT's 4-level neck), the BEiT / MAE segmentation recipe (AdamW,
layer-wise lr decay with the neck and heads at the top layer, weight decay 0.05, linear warm-up then
linear ("poly", power 1) decay, drop path 0.1, auxiliary FCN head at weight 0.4), trained with the
Trainer of `hf_mim.finetuning` and evaluated with the packaged mean-IoU module (offline).

Data: any data set with an image and a mask column (`segmentation/data.py`); without one, the
embedded digit scenes, trained with the class-balanced loss of `segmentation/loss.py` (why: there).
Masks are resized to the model's input size (nearest neighbour) for training and evaluation, so the
reported mIoU is at that resolution.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoBackbone, AutoConfig, TrainingArguments
from transformers.image_utils import PILImageResampling
from transformers.trainer_utils import set_seed

from ..cli import DATA_SOURCES, DataSourceArguments, MimArgumentParser, given, option
from ..finetuning.arguments import add_aliases, default_num_workers, has_accelerator
from ..finetuning.classifier import FINETUNING_CONFIG, change_image_size, check_image_size
from ..finetuning.run import check_can_push, data_seed, resume_checkpoint, scratch_config, setup_logging
from ..finetuning.transforms import default_mean_std
from ..metrics import load_mean_iou
from ..models.configuration_vit import default_pyramid_stages
from ..models.image_processing_mim import MimImageProcessor
from ..models.segmenter import MimUperNetConfig, MimUperNetForSemanticSegmentation
from ..run_lock import OutputDirLock
from .data import (
    DIGIT_SCENES_DESCRIPTION, DIGIT_SCENES_SOURCE, SegmentationData, SegmentationExamples, check_mask_values,
    load_segmentation_data,
)
from .loss import SegmentationTrainer, balanced_class_weights

logger = logging.getLogger(__name__)


@dataclass
class SegmentationArguments(DataSourceArguments):
    """Data (the options every script shares), model and recipe of a segmentation run (every TrainingArguments
    flag works too)."""

    _help_overrides = {
        "dataset_name": "Hub data set id with image and mask columns (e.g. scene_parse_150)",
        "train_dir": "folder with images/ and masks/ (same file names) for training",
        "validation_dir": "the same layout for evaluation",
        "train_file": "parquet file(s) with image and mask columns; globs allowed",
        "image_column_name": "image column (default: image, pixel_values, img)",
        "max_train_samples": "use only this many training images",
    }
    model_name_or_path: str | None = option(
        help="hf_mim checkpoint for the backbone (pre-training or fine-tuning; folder or Hub id). None: a tiny "
             "randomly initialised MAE encoder (--config_name to choose another)")
    config_name: str | None = option(help="backbone from scratch: a pre-training preset (mae-demo, mae-base, ...)")
    mask_column_name: str | None = option(help="mask column (default: label, mask, annotation, ...)")
    num_labels: int | None = option(help="number of classes (needed unless the data names them)")
    ignore_index: int = option(255, help="mask value of unlabelled pixels (left out of loss and mIoU)")
    num_scenes: int = option(600, help="digit scenes to generate (default data only)")
    scene_labels: str = option("ink", help="digit scenes' classes: ink (background / any digit; the default, learnt "
                                           "in CPU minutes) or digits (background + one per digit; needs far more "
                                           "training)")
    image_size: int | None = option(help="train at this resolution (position tables resized; default: the config's)")
    out_indices: list[int] | None = option(
        help="the 4 backbone stages for the neck (stage k = block k's output; default: BEiT's, [4, 6, 8, 12] of 12)")
    layer_decay: float = option(0.65, help="layer-wise lr decay (BEiT / MAE segmentation: 0.65 for base); 1 = off")
    drop_path: float = option(0.1, help="stochastic depth rate of the last block")
    decoder_channels: int = option(512, help="UperNet head width (the reference uses 512 for ViT-B)")
    auxiliary_channels: int = option(256, help="auxiliary FCN head width")
    auxiliary_loss_weight: float = option(0.4, help="weight of the auxiliary head's loss (0: no auxiliary head)")
    balance_classes: bool = option(False, help="weight each class in the loss by 1/sqrt(its pixel frequency in the "
                                               "training masks): keeps a small head from leaving rare classes at "
                                               "background (segmentation/loss.py; on for the digit scenes demo)")
    method: str | None = option(help="pre-training method for the model card (default: from the backbone type)")

    def hub_kwargs(self) -> dict:  # what finetuning.run.scratch_config passes to AutoConfig
        return {}


TRAINING_DEFAULTS = {
    "output_dir": "outputs/segment", "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16,
    "learning_rate": 1e-4, "num_train_epochs": 50.0, "weight_decay": 0.05, "lr_scheduler_type": "polynomial",
    "warmup_steps": 0.01, "eval_strategy": "epoch", "save_strategy": "epoch", "logging_steps": 10,
    "save_total_limit": 2, "remove_unused_columns": False, "report_to": "none", "do_train": True, "do_eval": True,
}
# The digit-scenes demo: a tiny backbone and head that learn in a few CPU minutes.
DEMO_DEFAULTS = {"num_train_epochs": 8.0, "learning_rate": 1e-3, "per_device_train_batch_size": 32,
                 "per_device_eval_batch_size": 64, "decoder_channels": 32, "auxiliary_channels": 16, "drop_path": 0.0,
                 "output_dir": "outputs/segment-demo", "warmup_steps": 0.05, "balance_classes": True}


def parse_segmentation_args(argv: list[str] | None = None) -> tuple[SegmentationArguments, TrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = MimArgumentParser((SegmentationArguments, TrainingArguments))
    add_aliases(parser)  # the same names as finetune.py (--max_train_steps, --checkpointing_steps, ...)
    defaults = {**TRAINING_DEFAULTS, "use_cpu": not has_accelerator(), "dataloader_num_workers": default_num_workers()}
    if not any(given(argv, name) for name in DATA_SOURCES):
        defaults.update(DEMO_DEFAULTS)
    parser.set_defaults(**defaults)
    return tuple(parser.parse_args_into_dataclasses(args=argv))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def backbone_config(args: SegmentationArguments):
    """The encoder's config as a 4-stage backbone with BEiT's neck (per-block BEiT tables, drop path)."""
    if args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
    else:
        config = scratch_config(args)
    if not hasattr(config, "add_fpn"):
        raise ValueError(f"{args.model_name_or_path or args.config_name} is a {config.model_type} model, not an hf_mim "
                         "encoder (MAE, BEiT, BEiT v2, ViT-MPP): it cannot be a segmentation backbone.")
    fields = {**config.to_dict(), "drop_path_rate": args.drop_path, "add_fpn": True,
              "out_indices": args.out_indices or default_pyramid_stages(config.num_hidden_layers)}
    if getattr(config, "use_shared_relative_position_bias", False):
        fields.update(FINETUNING_CONFIG[config.model_type])  # one table per block, each a copy of the shared one
    for key in ("model_type", "transformers_version", "out_features", "stage_names", "architectures", "auto_map"):
        fields.pop(key, None)
    return type(config)(**fields)


def build_segmenter(args: SegmentationArguments, id2label: dict[int, str], ignore_index: int):
    """UperNet (+ auxiliary FCN head) on the hf_mim backbone, loaded from the checkpoint when given."""
    config = backbone_config(args)
    backbone_class = AutoBackbone._model_mapping[type(config)]
    if args.model_name_or_path:
        backbone, info = backbone_class.from_pretrained(args.model_name_or_path, config=config,
                                                        output_loading_info=True)
        logger.info("Backbone from %s: new %s; unused from the checkpoint: %s.", args.model_name_or_path,
                    sorted(info["missing_keys"]), sorted(info["unexpected_keys"]) or "none")
    else:
        backbone = backbone_class(config)
    if args.image_size is not None:
        check_image_size(args.image_size, config.patch_size, args.model_name_or_path or "the backbone")
        backbone = change_image_size(backbone, args.image_size)
    segmenter_config = MimUperNetConfig(
        backbone_config=backbone.config, hidden_size=args.decoder_channels, auxiliary_channels=args.auxiliary_channels,
        use_auxiliary_head=args.auxiliary_loss_weight > 0, auxiliary_loss_weight=float(args.auxiliary_loss_weight),
        loss_ignore_index=ignore_index, id2label=id2label, label2id={name: i for i, name in id2label.items()},
    )
    segmenter = MimUperNetForSemanticSegmentation(segmenter_config)  # ships its code: loads without hf_mim
    segmenter.backbone = backbone  # the loaded weights (UperNet builds a random one from the config)
    return segmenter


# ---------------------------------------------------------------------------------------------
# Data, metric, card
# ---------------------------------------------------------------------------------------------


def class_names(args: SegmentationArguments, data: SegmentationData) -> dict[int, str]:
    if data.id2label is not None and args.num_labels in (None, len(data.id2label)):
        return data.id2label
    if args.num_labels is None:
        raise ValueError(f"{data.source}: pass --num_labels (the number of classes in the masks, the ignore index "
                         f"{args.ignore_index} not counted).")
    return {index: str(index) for index in range(args.num_labels)}


def metrics_function(id2label: dict[int, str], ignore_index: int):
    """Mean IoU, accuracies and each class's IoU (`iou_<name>`: shows which classes are learnt; a model
    that predicts background everywhere has a fair mean IoU and 0 for every other class)."""
    metric = load_mean_iou()

    def compute_metrics(prediction):
        results = metric.compute(predictions=list(prediction.predictions), references=list(prediction.label_ids),
                                 num_labels=len(id2label), ignore_index=ignore_index)
        per_class = {f"iou_{id2label[index].replace(' ', '_')}": float(iou)  # classes absent from both: left out
                     for index, iou in enumerate(results["per_category_iou"]) if np.isfinite(iou)}
        return {**{key: results[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}, **per_class}

    return compute_metrics


def segmentation_processor(size: int, config, mean, std) -> MimImageProcessor:
    """The evaluation transform (a plain resize to size x size, then mean / std), saved with the model
    so that the output folder loads with AutoImageProcessor."""
    return MimImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                             resample=PILImageResampling.BILINEAR, image_mean=list(mean), image_std=list(std),
                             patch_size=config.patch_size, do_convert_rgb=config.num_channels == 3)


def predicted_classes(logits, labels) -> torch.Tensor:
    """UperNet's logits [B, K, H, W] (already at the input size) -> class per pixel [B, H, W]; kept
    instead of the logits so that evaluation does not hold K maps per image."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(dim=1)


def recipe(args: SegmentationArguments, training_args, trainer, model) -> dict:
    total = training_args.per_device_train_batch_size * training_args.world_size * \
        training_args.gradient_accumulation_steps
    return {
        "learning_rate": training_args.learning_rate, "total_batch_size": total,
        "epochs": round(trainer.state.epoch or 0.0, 2), "optimizer_steps": trainer.state.global_step,
        "optimizer": training_args.optim, "layer_decay": args.layer_decay,
        "weight_decay": training_args.weight_decay, "warmup_steps": training_args.warmup_steps,
        "lr_scheduler_type": training_args.lr_scheduler_type, "drop_path": args.drop_path,
        "image_size": model.backbone.config.image_size, "out_indices": model.backbone.out_indices,
        "decoder_channels": args.decoder_channels, "auxiliary_loss_weight": args.auxiliary_loss_weight,
        "ignore_index": args.ignore_index, "balance_classes": args.balance_classes, "seed": training_args.seed,
    }


def write_card(args, training_args, data: SegmentationData, trainer, metrics: dict) -> None:
    from ..cards import write_model_card

    model = trainer.model
    backbone_type = model.backbone.config.model_type
    results = {name: metrics[f"eval_{name}"] for name in ("mean_iou", "overall_accuracy") if f"eval_{name}" in metrics}
    results.update({name.removeprefix("eval_"): value for name, value in metrics.items()  # each class's IoU
                    if name.startswith("eval_iou_")})
    write_model_card(
        training_args.output_dir, method=args.method or backbone_type.removeprefix("hf_mim_"), model_type="upernet",
        task="semantic-segmentation", recipe=recipe(args, training_args, trainer, model), results=results,
        dataset=f"{DIGIT_SCENES_DESCRIPTION}; {args.scene_labels} labels" if data.source == DIGIT_SCENES_SOURCE
        else data.source,
        dataset_config=args.dataset_config_name, eval_split=data.eval_split or "validation",
        base_model=args.model_name_or_path, tokenizer=None, tokenizer_revision=None, config=model.config,
        repo_id=training_args.hub_model_id, from_scratch=not args.model_name_or_path,
    )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_segmentation(args: SegmentationArguments, training_args: TrainingArguments) -> dict:
    """Fine-tune, evaluate (mIoU before and after) and save; returns the metrics (eval_* of the end,
    start_eval_* of the model before training)."""
    setup_logging(training_args)
    with OutputDirLock(training_args.output_dir, enabled=training_args.process_index == 0):  # one run per folder
        return segment_locked(args, training_args)


def segment_locked(args: SegmentationArguments, training_args: TrainingArguments) -> dict:
    set_seed(training_args.seed)
    if training_args.push_to_hub:
        check_can_push(training_args)
    with training_args.main_process_first(desc="loading the data set"):
        data = load_segmentation_data(
            dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_dir=args.train_dir,
            validation_dir=args.validation_dir, train_file=args.train_file, validation_file=args.validation_file,
            image_column_name=args.image_column_name, mask_column_name=args.mask_column_name,
            train_val_split=args.train_val_split, seed=data_seed(training_args), num_scenes=args.num_scenes,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
            scene_labels=args.scene_labels,
        )
    id2label = class_names(args, data)
    pixel_counts = {split: check_mask_values(dataset, data.mask_column, len(id2label), args.ignore_index, split)
                    for split, dataset in (("train", data.train), ("validation", data.eval))}  # [K] per split
    model = build_segmenter(args, id2label, args.ignore_index)
    config = model.backbone.config
    mean, std = default_mean_std(config.num_channels)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    flip = data.source != DIGIT_SCENES_SOURCE  # a mirrored digit is no digit
    examples = {split: SegmentationExamples(dataset, data.image_column, data.mask_column, size, mean, std,
                                            train=split == "train", horizontal_flip=flip)
                for split, dataset in (("train", data.train), ("eval", data.eval)) if dataset is not None}
    class_weights = None
    if args.balance_classes and data.train is not None:
        class_weights = balanced_class_weights(pixel_counts["train"])
        logger.info("Class weights (1/sqrt(pixel frequency)): %s.",
                    ", ".join(f"{id2label[i]} {w:.2f}" for i, w in enumerate(class_weights.tolist())))
    training_args.remove_unused_columns, training_args.label_names = False, ["labels"]
    push, training_args.push_to_hub = training_args.push_to_hub, False  # uploaded once at the end, by publish()
    trainer = SegmentationTrainer(
        model=model, args=training_args, train_dataset=examples.get("train"), eval_dataset=examples.get("eval"),
        compute_metrics=metrics_function(id2label, args.ignore_index) if "eval" in examples else None,
        preprocess_logits_for_metrics=predicted_classes, layer_decay=args.layer_decay, class_weights=class_weights,
        processing_class=segmentation_processor(size, config, mean, std),
    )
    metrics = {}
    if "eval" in examples:
        metrics.update(trainer.evaluate(metric_key_prefix="start_eval"))
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
        trainer.save_model()
        trainer.save_metrics("train", result.metrics)
        metrics.update(result.metrics)
    if "eval" in examples:
        evaluation = trainer.evaluate()
        trainer.log_metrics("eval", evaluation)
        trainer.save_metrics("eval", {**evaluation, **{k: v for k, v in metrics.items() if k.startswith("start_")}})
        metrics.update(evaluation)
    if training_args.do_train and trainer.is_world_process_zero():
        write_card(args, training_args, data, trainer, metrics)
        if push:
            from ..hub import publish

            url = publish(training_args.output_dir, training_args.hub_model_id, token=training_args.hub_token,
                          private=bool(training_args.hub_private_repo), revision=training_args.hub_revision,
                          commit_message="hf_mim semantic-segmentation fine-tuning")
            logger.info("Pushed to %s", url)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return run_segmentation(*parse_segmentation_args(argv))


__all__ = ["SegmentationArguments", "build_segmenter", "main", "parse_segmentation_args", "run_segmentation"]
