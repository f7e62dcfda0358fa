"""What a finished run leaves in --output_dir: the model, its image processor, a model card, the
results files and a reconstruction figure; optionally all of it on the Hub."""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import datasets
import torch
from torch.utils.data import default_collate

from ..checksums import write_model_manifest
from ..data import DIGITS_SOURCE, FixedSampler, ImageExamples
from ..files import apply_umask
from .tracking import plain

logger = logging.getLogger(__name__)

FIGURE_FILE = "reconstructions.png"
RUNTIME_KEYS = ("runtime", "samples_per_second", "steps_per_second", "samples", "skipped_images")


def save_model(run) -> None:
    """`save_pretrained` of the unwrapped model (gathered from every process under FSDP/DeepSpeed) + processor."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(run.model)  # collective
    model = accelerator.unwrap_model(run.model, keep_torch_compile=False)
    model.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict,
                          save_function=accelerator.save)
    if accelerator.is_main_process:
        run.processor.save_pretrained(args.output_dir)
        apply_umask(args.output_dir)  # the weights' temporary file was 0600
        write_model_manifest(args.output_dir)  # checksums: `python -m hf_mim.verify` tells a flipped bit


def figure_batch(run, count: int = 8) -> dict[str, torch.Tensor] | None:
    """The first held-out images (train images when there are none), with their fixed evaluation masks."""
    examples = run.eval_examples if isinstance(run.eval_examples, ImageExamples) else None
    if examples is None:  # no evaluation, or a streamed one
        source = run.data.eval if isinstance(run.data.eval, datasets.Dataset) else run.data.train
        if not isinstance(source, datasets.Dataset):
            return None
        examples = ImageExamples(source, run.data.image_column, run.method.eval_transform(run.processor),
                                 image_mode=run.method.image_mode)
    keys = list(FixedSampler(len(examples), run.args.data_seed))[:count]
    batch = default_collate([examples[key] for key in keys])
    batch.pop("num_skipped")
    batch.pop("labels", None)
    return {key: value.to(run.accelerator.device) for key, value in batch.items()}


def can_draw() -> bool:
    """matplotlib is optional (`pip install hf_mim[demo]`): without it the run ends without its figures."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    logger.warning("matplotlib is not installed: no %s (`pip install matplotlib` draws it next time); the model, "
                   "card and results are written as usual.", FIGURE_FILE)
    return False


def save_figure(run) -> str | None:
    batch = figure_batch(run)
    if batch is None:
        return None
    path = os.path.join(run.args.output_dir, FIGURE_FILE)
    was_training = run.model.training
    run.model.eval()
    with torch.no_grad():  # every process takes part (the methods may reduce), the main one draws
        drawn = run.method.save_reconstructions(run.model, batch, run.processor, path,
                                                draw=run.accelerator.is_main_process and can_draw())
    run.model.train(was_training)
    return path if drawn else None


def card_dataset(run) -> str:
    if run.data.source == DIGITS_SOURCE:
        return "scikit-learn handwritten digits (embedded demo data, 8x8 upscaled to 32x32)"
    return run.data.source


def recipe(run, results: dict) -> dict:
    args, plan = run.args, run.plan
    return {
        "method": run.method.name, "learning_rate": plan.learning_rate,
        "base_learning_rate": None if args.learning_rate is not None else args.base_learning_rate,
        "total_batch_size": plan.total_batch_size, "optimizer_steps": run.state.global_step,
        "epochs": round(results.get("epoch", 0.0), 2), "warmup_steps": plan.warmup_steps,
        "lr_scheduler_type": args.lr_scheduler_type, "weight_decay": args.weight_decay,
        "adam_betas": (args.adam_beta1, args.adam_beta2), "max_grad_norm": args.max_grad_norm,
        "mixed_precision": run.accelerator.mixed_precision, "image_size": run.method.image_size,
        **run.method.recipe(), "seed": args.seed, "processes": run.accelerator.num_processes,
    }


def card_kwargs(run, results: dict) -> dict:
    args = run.args
    measured = {key: value for key, value in results.items()
                if key.startswith("eval_") and not key.endswith(RUNTIME_KEYS) and isinstance(value, float)}
    model = run.accelerator.unwrap_model(run.model, keep_torch_compile=False)
    tokenizer, tokenizer_revision = run.method.card_tokenizer()
    return {
        "method": run.method.card_name or run.method.name, "model_type": model.config.model_type, "task": "pretraining",
        "recipe": {key: value for key, value in recipe(run, results).items() if value is not None},
        "results": measured, "dataset": card_dataset(run), "dataset_config": args.dataset_config_name,
        "eval_split": run.data.eval_split or "validation", "base_model": args.model_name_or_path,
        "tokenizer": tokenizer, "tokenizer_revision": tokenizer_revision, "config": model.config, "image_processor": True,
        "repo_id": args.hub_model_id, "revision": args.hub_revision,
    }


def write_card(run, results: dict) -> None:
    from ..cards import write_model_card

    write_model_card(run.args.output_dir, **card_kwargs(run, results))


def push(run) -> None:
    from ..hub import DEFAULT_IGNORE_PATTERNS, publish

    args = run.args
    url = publish(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo,
                  revision=args.hub_revision, commit_message=f"hf_mim pre-training ({run.method.name})",
                  ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, ".tmp-checkpoint-*", ".tmp-checkpoint-*/*"])
    logger.info("Pushed to %s", url)


def save_outputs(run, results: dict) -> None:
    """Model, processor, figure and card (after training), and the Hub upload when asked."""
    if not run.args.do_train:
        return
    save_model(run)
    figure = save_figure(run)
    if run.accelerator.is_main_process:
        write_card(run, results)
        logger.info("Saved the model, image processor and model card to %s%s", run.args.output_dir,
                    f"; reconstructions in {figure}" if figure else "")
        if results.get("skipped_images"):
            logger.warning("%d unreadable images were skipped during training (each replaced by the next readable "
                           "one); see the warnings above for the first ones.", results["skipped_images"])
        if run.args.push_to_hub:
            push(run)
    run.accelerator.wait_for_everyone()


def write_results(run, results: dict) -> None:
    """train_results.json, eval_results.json and all_results.json (main process)."""
    if not run.accelerator.is_main_process or not results:
        return
    clean = {key: plain(value) for key, value in results.items()}
    parts = {"train_results.json": {k: v for k, v in clean.items() if not k.startswith("eval_")},
             "eval_results.json": {k: v for k, v in clean.items() if k.startswith("eval_")},
             "all_results.json": clean}
    for name, values in parts.items():
        if values:
            with open(os.path.join(run.args.output_dir, name), "w") as handle:
                json.dump(values, handle, indent=2, default=str)


__all__ = ["FIGURE_FILE", "save_outputs", "write_results"]
