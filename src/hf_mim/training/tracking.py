"""Experiment tracking: an always-on JSONL log plus whatever `--report_to` asks accelerate for."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time

from accelerate.tracking import GeneralTracker

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


def plain(value):
    """A JSON-friendly number (tensors and numpy scalars to Python floats; NaN/inf kept as strings)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per `log` call to `<output_dir>/log.jsonl`: {"step": ..., **values}.

    A resumed run appends too, after a {"event": "resume", "step": N} line; readers keep the LAST
    record of each step (see :func:`read_log`)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, output_dir: str):
        super().__init__()
        self.path = os.path.join(output_dir, LOG_FILE)

    @property
    def tracker(self):
        return self.path

    def write(self, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({key: plain(value) for key, value in record.items()}) + "\n")

    def store_init_configuration(self, values: dict) -> None:
        self.write({"event": "start", "time": time.time(), "config": values})

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.write({"step": step, **values})


def read_log(path: str, key: str) -> dict[int, float]:
    """step -> value of `key`, the last record of each step winning (a resumed run rewrites its steps)."""
    values = {}
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("step") is not None and key in record:
                values[record["step"]] = record[key]
    return values


def available_report_targets() -> list[str]:
    return [name for name, module in (("tensorboard", "tensorboard"), ("tensorboard", "tensorboardX"),
                                       ("wandb", "wandb"), ("mlflow", "mlflow"), ("comet_ml", "comet_ml"))
            if importlib.util.find_spec(module) is not None]


def resolve_trackers(report_to: list[str], output_dir: str) -> list:
    """`log_with` for the Accelerator: the JSONL log always; "auto" adds tensorboard when installed;
    "none" adds nothing; "all" every installed integration; other names pass through."""
    trackers: list = [JsonlTracker(output_dir)]
    names = [name.lower() for name in report_to]
    if "none" in names:
        return trackers
    if "all" in names:
        return trackers + ["all"]
    for name in names:
        if name == "auto":
            if "tensorboard" in available_report_targets():
                trackers.append("tensorboard")
        elif name not in trackers:
            trackers.append(name)
    return trackers


def hyperparameters(args, **decided) -> dict:
    """The run's options, and what the run `decided` itself (e.g. its data-loader workers), as tracker-safe
    values (tensorboard takes only numbers, strings and bools)."""
    values = {}
    for key, value in sorted({**vars(args), **decided}.items()):
        if key in ("token", "hub_token", "recipe_inputs"):  # secrets; the recipe's inputs (its values are keys)
            continue
        values[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


__all__ = ["LOG_FILE", "JsonlTracker", "hyperparameters", "read_log", "resolve_trackers"]
