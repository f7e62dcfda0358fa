"""Image-classification fine-tuning with the transformers Trainer (`examples/finetune.py`).

Data through `hf_mim.data` (Hub id, image folders, parquet, or the embedded digits), any hf_mim
checkpoint (or a from-scratch config), the BEiT / MAE recipe (layer decay, drop path, RandAugment,
MixUp / CutMix, label smoothing, random erasing), top-1 / top-5 accuracy from the metric module
shipped in the package (offline), and at the end the model, its image processor, a model card and
the results files in --output_dir; with --push_to_hub all of it on the Hub via `hf_mim.hub.publish`.
"""

from __future__ import annotations

import logging
import os
import sys

import datasets
import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor
from transformers.trainer_utils import IntervalStrategy, set_seed

from ..data import DIGITS_SOURCE, ImageDatasets, ImageExamples, load_image_datasets
from ..data_fingerprint import data_fingerprint
from ..launch import check_one_run_per_launch, warn_if_bf16_is_emulated
from ..metrics import load_top_k_accuracy
from ..models.presets import from_preset, preset_names
from ..preemption import Preempted, PreemptionGuard, resume_hint
from ..registry import FAMILIES
from ..run_lock import OutputDirLock
from ..training.checkpoints import resolve_resume_path
from ..training.data_loading import cores_per_process
from ..training.model_choice import train_image_count
from .arguments import (
    DataArguments, FinetuningArguments, ModelArguments, parse_finetuning_args, resolve_finetuning_recipe,
)
from .classifier import Labels, build_classifier, load_classifier, read_labels
from .ema import ModelEmaCallback, check_ema_compatible
from .mixup import SoftTargets
from .preemption import PreemptionCallback
from .trainer import FinetuningTrainer
from .transforms import (
    ClassificationCollator, default_mean_std, evaluation_example_transform, evaluation_processor, train_transform,
    training_example_transform,
)

logger = logging.getLogger(__name__)

DEMO_PRESET = "mae-demo"
DIGITS_DESCRIPTION = "scikit-learn handwritten digits (embedded demo data, 8x8 upscaled to 32x32)"


def setup_logging(training_args) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    for name in ("datasets", "huggingface_hub"):  # their own handler besides the root's printed each warning twice
        logging.getLogger(name).handlers.clear()
    logging.getLogger("hf_mim").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    level = training_args.get_process_log_level()  # --log_level (default: transformers' own, warnings)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def load_data(data_args: DataArguments, model_args: ModelArguments, training_args) -> ImageDatasets:
    with training_args.main_process_first(desc="loading the data set"):
        return load_image_datasets(
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            train_dir=data_args.train_dir, validation_dir=data_args.validation_dir, train_file=data_args.train_file,
            validation_file=data_args.validation_file, cache_dir=model_args.cache_dir, token=model_args.token,
            image_column_name=data_args.image_column_name, label_column_name=data_args.label_column_name,
            train_val_split=data_args.train_val_split, seed=data_seed(training_args),
            max_train_samples=data_args.max_train_samples, max_eval_samples=data_args.max_eval_samples,
        )


def data_seed(training_args) -> int:
    return training_args.data_seed if training_args.data_seed is not None else training_args.seed


def scratch_config(model_args: ModelArguments):
    """--config_name (a pre-training preset or a config), or the digits demo's tiny MAE encoder."""
    name = model_args.config_name or DEMO_PRESET
    classifiable = [config.model_type for config, *_, classifier in FAMILIES.values() if classifier is not None]
    for model_type in classifiable:
        if name in preset_names(model_type):
            return from_preset(name, model_type)
    return AutoConfig.from_pretrained(name, **model_args.hub_kwargs())


def build_model(model_args: ModelArguments, finetuning_args: FinetuningArguments, labels: Labels, data: ImageDatasets):
    if model_args.model_name_or_path:
        return load_classifier(
            model_args.model_name_or_path, labels, drop_path=finetuning_args.drop_path,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, image_size=model_args.image_size,
            **model_args.hub_kwargs(),
        )
    if not model_args.config_name and data.source != DIGITS_SOURCE:
        raise ValueError("Pass --model_name_or_path (a pre-trained hf_mim checkpoint) to fine-tune, or --config_name "
                         "(a preset such as mae-base, or a config) to train from scratch.")
    logger.info("No --model_name_or_path: training %s from scratch (fine-tune the pre-training demo instead with "
                "--model_name_or_path outputs/pretrain-mae).", model_args.config_name or f"the {DEMO_PRESET} encoder")
    return build_classifier(scratch_config(model_args), labels, drop_path=finetuning_args.drop_path,
                            image_size=model_args.image_size)


def build_processor(model_args: ModelArguments, crop_pct: float, config, image_size=None):
    """The evaluation transform, saved with the model: --image_processor_name as given, or resize +
    centre crop with the checkpoint processor's mean / std (ImageNet's when it has none)."""
    if model_args.image_processor_name:
        return AutoImageProcessor.from_pretrained(model_args.image_processor_name, **model_args.hub_kwargs())
    mean, std = default_mean_std(config.num_channels)
    if model_args.model_name_or_path:
        try:
            saved = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **model_args.hub_kwargs())
            mean, std = list(saved.image_mean), list(saved.image_std)
        except OSError:
            logger.info("%s has no image processor: normalising with %s / %s.", model_args.model_name_or_path, mean, std)
    return evaluation_processor(image_size or config.image_size, config.patch_size, config.num_channels, crop_pct,
                                mean, std)


def build_examples(data: ImageDatasets, processor, config, finetuning_args: FinetuningArguments):
    mode = "RGB" if config.num_channels == 3 else "L"
    augment = train_transform(config.image_size, processor.image_mean, processor.image_std,
                              crop_min_scale=finetuning_args.crop_min_scale, hflip=finetuning_args.hflip,
                              auto_augment=finetuning_args.aa, reprob=finetuning_args.reprob)
    train = eval_ = None
    if data.train is not None:
        train = ImageExamples(data.train, data.image_column, training_example_transform(augment), image_mode=mode,
                              label_column=data.label_column)
    if data.eval is not None:
        eval_ = ImageExamples(data.eval, data.image_column, evaluation_example_transform(processor), image_mode=mode,
                              label_column=data.label_column)
    return train, eval_


def metric_ks(num_labels: int) -> list[int]:
    """Top-1, and top-5 when there are more than 5 classes (with 5 or fewer it is always 1)."""
    return [1, 5] if num_labels > 5 else [1]


def metrics_function(num_labels: int):
    metric, ks = load_top_k_accuracy(), metric_ks(num_labels)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=logits, references=prediction.label_ids, k=ks)

    return compute_metrics


def set_learning_rate(training_args, finetuning_args: FinetuningArguments) -> None:
    """The linear scaling rule lr = blr * total batch / 256, unless --learning_rate was given."""
    if finetuning_args.base_learning_rate is None:
        return
    total = training_args.per_device_train_batch_size * training_args.world_size * \
        training_args.gradient_accumulation_steps
    training_args.learning_rate = finetuning_args.base_learning_rate * total / 256
    logger.info("learning rate %.3g = blr %.3g * total batch %d / 256", training_args.learning_rate,
                finetuning_args.base_learning_rate, total)


def check_training_args(training_args, data: ImageDatasets, finetuning_args: FinetuningArguments) -> None:
    if training_args.label_smoothing_factor:
        raise ValueError("Use --smoothing for label smoothing (it combines with MixUp / CutMix); "
                         "--label_smoothing_factor is the Trainer's own and would ignore them.")
    if training_args.push_to_hub:
        check_can_push(training_args)
    if finetuning_args.model_ema:
        check_ema_compatible(training_args)
    if data.eval is None and training_args.eval_strategy != IntervalStrategy.NO:
        logger.warning("No evaluation data (no validation split and --train_val_split 0): evaluation is off.")
        training_args.eval_strategy = IntervalStrategy.NO
    if data.train is None and training_args.do_train:
        raise ValueError(f"{data.source} has no training split: pass training data (or evaluate only with --do_train "
                         "False --do_eval).")
    training_args.remove_unused_columns = False  # examples are tensors already; nothing to remove
    training_args.label_names = ["labels"]


def check_can_push(training_args) -> None:
    """Fail before training, not after it, when the final upload could not happen."""
    from huggingface_hub import get_token

    from ..hub import TOKEN_HELP

    if not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id NAMESPACE/NAME (the repository to create or update).")
    if not (training_args.hub_token or get_token()):
        raise ValueError(f"--push_to_hub: no Hugging Face token to upload {training_args.hub_model_id} with: "
                         f"{TOKEN_HELP}.")


def resume_checkpoint(training_args) -> str | None:
    """--resume_from_checkpoint PATH | latest | none; not given: the newest checkpoint in --output_dir
    (`resolve_resume_path`: complete and intact; a damaged newest one gives way to an older one, and when
    every checkpoint is damaged an error, never a fresh start over them)."""
    value = training_args.resume_from_checkpoint
    if value is not None and value.lower() in ("none", "no", "false"):
        return None
    if value is not None and value.lower() in ("latest", "last", "true"):
        value = "latest"
    elif value is not None and not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value} is not a checkpoint folder.")
    path = resolve_resume_path(value, training_args.output_dir, auto_resume=True)
    if path is not None and value is None:
        logger.info("Resuming from %s (pass --resume_from_checkpoint none to start afresh).", path)
    return None if path is None else str(path)


def recipe(model, training_args, finetuning_args: FinetuningArguments, trainer) -> dict:
    mixing = finetuning_args.mixup > 0 or finetuning_args.cutmix > 0
    total = training_args.per_device_train_batch_size * training_args.world_size * \
        training_args.gradient_accumulation_steps
    values = {
        "learning_rate": training_args.learning_rate, "base_learning_rate": finetuning_args.base_learning_rate,
        "total_batch_size": total, "epochs": round(trainer.state.epoch or 0.0, 2),
        "optimizer_steps": trainer.state.global_step, "optimizer": training_args.optim,
        "layer_decay": finetuning_args.layer_decay, "weight_decay": training_args.weight_decay,
        "warmup_steps": training_args.warmup_steps, "lr_scheduler_type": training_args.lr_scheduler_type,
        "drop_path": model.config.drop_path_rate, "smoothing": finetuning_args.smoothing,
        "mixup": finetuning_args.mixup, "cutmix": finetuning_args.cutmix,
        "mixup_prob": finetuning_args.mixup_prob if mixing else None,
        "mixup_switch_prob": finetuning_args.mixup_switch_prob if finetuning_args.mixup and finetuning_args.cutmix else None,
        "aa": finetuning_args.aa, "reprob": finetuning_args.reprob, "crop_min_scale": finetuning_args.crop_min_scale,
        "hflip": finetuning_args.hflip, "crop_pct": finetuning_args.crop_pct, "image_size": model.config.image_size,
        "max_grad_norm": training_args.max_grad_norm, "bf16": training_args.bf16, "fp16": training_args.fp16,
        "model_ema_decay": finetuning_args.model_ema_decay if finetuning_args.model_ema else None,
        "seed": training_args.seed,
    }
    return {key: value for key, value in values.items() if value is not None}


def card_kwargs(model, model_args, data: ImageDatasets, results: dict, recipe_values: dict, hub_model_id) -> dict:
    method = model_args.method or model.config.model_type.removeprefix("hf_mim_")
    return {
        "method": method, "model_type": model.config.model_type, "task": "image-classification",
        "recipe": recipe_values, "results": results,
        "dataset": DIGITS_DESCRIPTION if data.source == DIGITS_SOURCE else data.source,
        "eval_split": data.eval_split or "validation", "base_model": model_args.model_name_or_path,
        "tokenizer": None, "tokenizer_revision": None, "config": model.config, "image_processor": True,
        "repo_id": hub_model_id, "from_scratch": not model_args.model_name_or_path,
    }


def limit_cpu_threads(training_args) -> None:
    """On CPU, one compute thread per core left after the data-loader workers (as the training loop of `hf_mim.training`):
    more threads than cores make torch's CPU kernels spin and run several times slower."""
    if not training_args.use_cpu or "OMP_NUM_THREADS" in os.environ:
        return
    cores = cores_per_process(num_processes=1)  # LOCAL_WORLD_SIZE, when launched, wins
    torch.set_num_threads(max(1, cores - training_args.dataloader_num_workers))


def run_finetuning(model_args: ModelArguments, data_args: DataArguments, finetuning_args: FinetuningArguments,
                   training_args) -> dict:
    """Fine-tune, evaluate and save; returns the final metrics (train_* and eval_*)."""
    setup_logging(training_args)
    # One run per output folder (main process; --do_eval alone writes results there too).
    with OutputDirLock(training_args.output_dir, enabled=training_args.process_index == 0):
        return finetune_locked(model_args, data_args, finetuning_args, training_args)


def finetune_locked(model_args: ModelArguments, data_args: DataArguments, finetuning_args: FinetuningArguments,
                    training_args) -> dict:
    limit_cpu_threads(training_args)
    check_one_run_per_launch(training_args.world_size)  # --use_cpu (the default without a GPU) joins a gloo group
    warn_if_bf16_is_emulated("bf16" if training_args.bf16 else None, training_args.device)
    set_seed(training_args.seed)
    data = load_data(data_args, model_args, training_args)
    logger.info(resolve_finetuning_recipe(finetuning_args, training_args, train_image_count(data)))  # and why
    check_training_args(training_args, data, finetuning_args)
    labels = read_labels(data)
    model = build_model(model_args, finetuning_args, labels, data)
    processor = build_processor(model_args, finetuning_args.crop_pct, model.config)
    train_examples, eval_examples = build_examples(data, processor, model.config, finetuning_args)
    set_learning_rate(training_args, finetuning_args)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # uploaded once at the end, by publish()
    checkpoint = resume_checkpoint(training_args) if training_args.do_train else None
    # The EMA callback loads its average from the checkpoint the Trainer resumes from.
    preemption = PreemptionGuard()
    callbacks = [PreemptionCallback(preemption)]
    if finetuning_args.model_ema:
        callbacks.append(ModelEmaCallback(finetuning_args.model_ema_decay, checkpoint))
    soft_targets = SoftTargets(model.config.num_labels, finetuning_args.mixup, finetuning_args.cutmix,
                               finetuning_args.smoothing, finetuning_args.mixup_prob, finetuning_args.mixup_switch_prob)
    trainer = FinetuningTrainer(
        model=model, args=training_args, train_dataset=train_examples, eval_dataset=eval_examples,
        processing_class=processor, data_collator=ClassificationCollator(model.config.num_labels),
        compute_metrics=metrics_function(model.config.num_labels) if eval_examples is not None else None,
        layer_decay=finetuning_args.layer_decay, soft_targets=soft_targets, callbacks=callbacks,
        # Written and compared by the saving process only (a listing of every training file: not on every rank).
        data_fingerprint=data_fingerprint(data, data_args.train_dir, data_args.train_file)
        if training_args.should_save else None,
    )
    metrics = {}
    if training_args.do_train:
        with preemption:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        stop_if_preempted(trainer, preemption)
        trainer.save_model()  # model (with its remote code), the image processor, checksums
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if eval_examples is not None and (training_args.do_eval or training_args.do_train):
        evaluation = trainer.evaluate()
        trainer.log_metrics("eval", evaluation)
        trainer.save_metrics("eval", evaluation)
        metrics.update(evaluation)
    if training_args.do_train and trainer.is_world_process_zero():
        finish(trainer, model_args, data, finetuning_args, training_args, metrics, push)
    return metrics


def stop_if_preempted(trainer, preemption: PreemptionGuard) -> None:
    """After a run that a signal stopped (PreemptionCallback saved its checkpoint): say how to resume, exit."""
    signum = preemption.signum
    if signum is None:
        return
    if trainer.is_world_process_zero():
        folder = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
        logger.warning(resume_hint(trainer.args.output_dir, folder, signum))
    raise Preempted(signum)


def finish(trainer, model_args, data, finetuning_args, training_args, metrics: dict, push: bool) -> None:
    """Model card (what was run and measured), then the upload."""
    from ..cards import write_model_card

    model = trainer.model
    results = {f"top{k}": metrics[f"eval_top{k}"] for k in metric_ks(model.config.num_labels) if f"eval_top{k}" in metrics}
    kwargs = card_kwargs(model, model_args, data, results, recipe(model, training_args, finetuning_args, trainer),
                         training_args.hub_model_id)
    write_model_card(training_args.output_dir, **kwargs)
    logger.info("Saved the model, image processor and model card to %s", training_args.output_dir)
    if push:
        from ..hub import publish

        url = publish(training_args.output_dir, training_args.hub_model_id, token=training_args.hub_token,
                      private=bool(training_args.hub_private_repo), revision=training_args.hub_revision,
                      commit_message="hf_mim image-classification fine-tuning")
        logger.info("Pushed to %s", url)


def main(argv: list[str] | None = None) -> dict:
    return run_finetuning(*parse_finetuning_args(argv))


__all__ = ["main", "run_finetuning"]
