"""Evaluation of a frozen encoder: pooled features, a linear probe and k-NN accuracy.

Features: the encoder's output for the whole image (no masking), pooled as the CLS token after the
final norm (`cls`, what MAE's linear probe uses) or the mean of the final-normed patch tokens
(`mean`), computed once with the evaluation transform (resize + centre crop; no augmentation).

Linear probe: BatchNorm1d(affine=False) + Linear on the fixed features, as in MAE, trained with SGD
(momentum 0.9, no weight decay, cosine schedule) instead of MAE's LARS over 90 augmented epochs:
fixed features make every epoch cheap, and with batch-normalised inputs plain SGD converges alike.

k-NN: DINO's weighted vote: cosine similarity to every training feature, the k nearest (k = 20)
vote with weight exp(similarity / T) (T = 0.07); the class with the largest summed weight wins.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, set_seed

from ..cli import MimArgumentParser
from ..data import ImageExamples, load_image_datasets
from .arguments import DataArguments, ModelArguments, default_num_workers
from .classifier import read_labels
from .run import build_processor, scratch_config
from .transforms import ClassificationCollator, evaluation_example_transform

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")


@dataclass
class ProbeSettings:
    epochs: int = 90
    batch_size: int = 256
    learning_rate: float = 0.1
    momentum: float = 0.9
    knn_k: int = 20
    knn_temperature: float = 0.07
    seed: int = 0


def pool(hidden_states: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, 1+N, D] (CLS first) -> [B, D]."""
    if pooling == "cls":
        return hidden_states[:, 0]
    if pooling == "mean":
        return hidden_states[:, 1:].mean(dim=1)
    raise ValueError(f"--pooling must be one of {POOLINGS}, got {pooling!r}.")


@torch.no_grad()
def extract_features(encoder: nn.Module, batches, pooling: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features [N, D] (float32, CPU) and labels [N] of every batch {"pixel_values", "labels"}."""
    encoder.eval()
    device = device or next(encoder.parameters()).device
    features, labels = [], []
    for batch in batches:
        hidden = encoder(pixel_values=batch["pixel_values"].to(device)).last_hidden_state  # [B, 1+N, D]
        features.append(pool(hidden, pooling).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(features), torch.cat(labels)


def top_k_correct(scores: torch.Tensor, labels: torch.Tensor, ks) -> dict[int, int]:
    """How many rows of `scores` [N, C] have their label among the k best, for every k."""
    ranked = scores.topk(max(ks), dim=1).indices  # [N, kmax]
    hits = ranked == labels[:, None]  # [N, kmax]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def reported_ks(num_classes: int) -> list[int]:
    return [1, 5] if num_classes > 5 else [1]


def train_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                       settings: ProbeSettings) -> nn.Module:
    """BatchNorm1d(affine=False) + Linear, SGD with a per-step cosine schedule, seeded."""
    generator = torch.Generator().manual_seed(settings.seed)
    probe = nn.Sequential(nn.BatchNorm1d(train_features.shape[1], affine=False),
                          nn.Linear(train_features.shape[1], num_classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01, generator=generator)  # MAE's probe head init
    nn.init.zeros_(probe[1].bias)
    optimizer = torch.optim.SGD(probe.parameters(), lr=settings.learning_rate, momentum=settings.momentum)
    count = train_features.shape[0]
    batch_size = min(settings.batch_size, count)
    steps_per_epoch = count // batch_size  # drop the last partial batch (BatchNorm needs > 1 sample)
    total = max(1, settings.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    probe.train()
    for _ in range(settings.epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(probe(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval()


def linear_probe_accuracy(train_features, train_labels, eval_features, eval_labels, num_classes: int,
                          settings: ProbeSettings) -> dict[str, float]:
    probe = train_linear_probe(train_features, train_labels, num_classes, settings)
    with torch.no_grad():
        correct = top_k_correct(probe(eval_features), eval_labels, reported_ks(num_classes))
    return {f"linear_top{k}": hits / len(eval_labels) for k, hits in correct.items()}


@torch.no_grad()
def knn_accuracy(train_features, train_labels, eval_features, eval_labels, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict[str, float]:
    """DINO's temperature-weighted k-NN vote on cosine similarity."""
    if k < 1:
        raise ValueError(f"--knn_k must be at least 1, got {k}.")
    k = min(k, len(train_labels))
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    ks = reported_ks(num_classes)
    correct = dict.fromkeys(ks, 0)
    for start in range(0, len(eval_labels), chunk):
        queries = F.normalize(eval_features[start:start + chunk].float(), dim=1)  # [Q, D]
        similarity, neighbours = (queries @ train.T).topk(k, dim=1)  # [Q, k] each
        weights = (similarity / temperature).exp()  # [Q, k]
        votes = torch.zeros(len(queries), num_classes).scatter_add_(1, train_labels[neighbours], weights)  # [Q, C]
        for key, hits in top_k_correct(votes, eval_labels[start:start + chunk], ks).items():
            correct[key] += hits
    return {f"knn_top{key}": hits / len(eval_labels) for key, hits in correct.items()}


def evaluate_features(train_features, train_labels, eval_features, eval_labels, num_classes: int,
                      settings: ProbeSettings | None = None) -> dict[str, float]:
    """Linear-probe and k-NN accuracy of fixed features."""
    settings = settings or ProbeSettings()
    if len(train_labels) < 2:
        raise ValueError(f"A probe needs at least 2 training images, got {len(train_labels)}.")
    return {
        **linear_probe_accuracy(train_features, train_labels, eval_features, eval_labels, num_classes, settings),
        **knn_accuracy(train_features, train_labels, eval_features, eval_labels, num_classes, settings.knn_k,
                       settings.knn_temperature),
    }


# ---------------------------------------------------------------------------------------------
# Command line (examples/probe.py)
# ---------------------------------------------------------------------------------------------

PRETRAINING_DEMO_OUTPUT = "outputs/pretrain-mae"


@dataclass
class ProbeArguments:
    pooling: str = field(default="cls", metadata={"help": "cls: CLS token after the final norm; mean: mean patch token"})
    probe_epochs: int = field(default=90, metadata={"help": "linear-probe epochs over the fixed features"})
    probe_batch_size: int = field(default=256, metadata={"help": "linear-probe batch size"})
    probe_learning_rate: float = field(default=0.1, metadata={"help": "linear-probe SGD learning rate (cosine decay)"})
    knn_k: int = field(default=20, metadata={"help": "neighbours that vote (DINO: 20)"})
    knn_temperature: float = field(default=0.07, metadata={"help": "vote weight exp(cosine / T) (DINO: 0.07)"})
    crop_pct: float = field(default=0.875, metadata={"help": "resize to image_size / crop_pct, then centre crop"})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "batch size of the feature extraction"})
    dataloader_num_workers: int | None = field(default=None, metadata={"help": "default: CPU cores - 1, at most 8"})
    output_dir: str = field(default="outputs/probe", metadata={"help": "where probe_results.json is written"})
    seed: int = field(default=42, metadata={"help": "seed of the split and the probe"})
    use_cpu: bool = field(default=False, metadata={"help": "run on the CPU even when a GPU is available"})


def load_encoder(model_args, probe_args):
    """The base encoder (AutoModel) of a checkpoint, or a random one from --config_name (a baseline)."""
    if model_args.config_name and not model_args.model_name_or_path:
        return AutoModel.from_config(scratch_config(model_args)), f"random init ({model_args.config_name})"
    path = model_args.model_name_or_path or PRETRAINING_DEMO_OUTPUT
    if not model_args.model_name_or_path and not os.path.isdir(path):
        raise ValueError(f"Pass --model_name_or_path (an hf_mim checkpoint), or run examples/pretrain.py first: "
                         f"without it the probe evaluates {PRETRAINING_DEMO_OUTPUT}, which does not exist.")
    encoder, info = AutoModel.from_pretrained(path, output_loading_info=True, **model_args.hub_kwargs())
    if info["missing_keys"]:
        logger.warning("%s lacks %s for the encoder: they are randomly initialised (a classifier fine-tuned with mean "
                       "pooling has no final norm; --pooling mean is then the better probe).", path,
                       sorted(info["missing_keys"]))
    return encoder, path


def feature_loader(dataset, data, processor, mode: str, num_labels: int, probe_args):
    examples = ImageExamples(dataset, data.image_column, evaluation_example_transform(processor), image_mode=mode,
                             label_column=data.label_column)
    return torch.utils.data.DataLoader(examples, batch_size=probe_args.per_device_eval_batch_size,
                                       num_workers=probe_args.dataloader_num_workers,
                                       collate_fn=ClassificationCollator(num_labels))


def run_probe(model_args, data_args, probe_args) -> dict:
    """Features of the train and evaluation splits, linear probe and k-NN; writes probe_results.json."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    if probe_args.pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {POOLINGS}, got {probe_args.pooling!r}.")
    set_seed(probe_args.seed)  # a random-init baseline (--config_name) is the same encoder every run
    if probe_args.dataloader_num_workers is None:
        probe_args.dataloader_num_workers = default_num_workers()
    data = load_image_datasets(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir, validation_dir=data_args.validation_dir, train_file=data_args.train_file,
        validation_file=data_args.validation_file, cache_dir=model_args.cache_dir, token=model_args.token,
        image_column_name=data_args.image_column_name, label_column_name=data_args.label_column_name,
        train_val_split=data_args.train_val_split, seed=probe_args.seed,
        max_train_samples=data_args.max_train_samples, max_eval_samples=data_args.max_eval_samples,
    )
    if data.train is None or data.eval is None:
        raise ValueError(f"A probe needs a training and an evaluation split; {data.source} gave "
                         f"{'no training split' if data.train is None else 'no evaluation split (--train_val_split 0?)'}.")
    labels = read_labels(data)
    encoder, source = load_encoder(model_args, probe_args)
    device = "cuda" if torch.cuda.is_available() and not probe_args.use_cpu else "cpu"
    encoder.to(device)
    processor = build_processor(model_args, probe_args.crop_pct, encoder.config, image_size=model_args.image_size)
    mode = "RGB" if encoder.config.num_channels == 3 else "L"
    features = {}
    for split, dataset in (("train", data.train), ("eval", data.eval)):
        loader = feature_loader(dataset, data, processor, mode, labels.num_labels, probe_args)
        features[split] = extract_features(encoder, loader, probe_args.pooling, device)
        logger.info("%s features: %s", split, list(features[split][0].shape))
    settings = ProbeSettings(epochs=probe_args.probe_epochs, batch_size=probe_args.probe_batch_size,
                             learning_rate=probe_args.probe_learning_rate, knn_k=probe_args.knn_k,
                             knn_temperature=probe_args.knn_temperature, seed=probe_args.seed)
    metrics = evaluate_features(*features["train"], *features["eval"], labels.num_labels, settings)
    results = {
        "model": source, "pooling": probe_args.pooling, "dataset": data.source, "eval_split": data.eval_split,
        "num_train": len(features["train"][1]), "num_eval": len(features["eval"][1]),
        "num_classes": labels.num_labels, "feature_dim": features["train"][0].shape[1], **metrics,
        "settings": asdict(settings),
    }
    os.makedirs(probe_args.output_dir, exist_ok=True)
    path = os.path.join(probe_args.output_dir, "probe_results.json")
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    logger.info("%s", ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    logger.info("Wrote %s", path)
    return results


def parse_probe_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, ProbeArguments]:
    return MimArgumentParser((ModelArguments, DataArguments, ProbeArguments)).parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    return run_probe(*parse_probe_args(argv))


__all__ = [
    "POOLINGS", "ProbeArguments", "ProbeSettings", "evaluate_features", "extract_features", "knn_accuracy",
    "linear_probe_accuracy", "main", "parse_probe_args", "pool", "run_probe", "train_linear_probe",
]
