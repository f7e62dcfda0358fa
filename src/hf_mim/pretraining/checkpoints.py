"""Crash-safe training checkpoints: `checkpoint-<step>` folders written by `accelerator.save_state`.

A checkpoint is written into `.tmp-checkpoint-<step>`, flushed to disk, and renamed into place:
the rename is atomic, so a folder named `checkpoint-<step>` is always complete, and a crash while
writing leaves the previous checkpoint as the latest. `trainer_state.json` inside it records where
the run stood (step, epoch, position in the epoch), which `save_state` does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where a run stands: optimiser steps done, the epoch, and the micro-batches of that epoch consumed."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    skipped_images: int = 0  # unreadable images drawn (and replaced) so far
    # The settings that fix the data order; resuming with others cannot continue exactly.
    num_processes: int = 1
    per_device_train_batch_size: int = 0
    gradient_accumulation_steps: int = 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainerState:
        fields = json.loads(Path(path).read_text())
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in fields.items() if key in known})


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str, auto_resume: bool) -> Path | None:
    """A path, "latest" (the newest in output_dir; error if none), or automatically the newest one."""
    if resume_from_checkpoint in (None, ""):
        return latest_checkpoint(output_dir) if auto_resume else None
    if resume_from_checkpoint == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint-<step>.")
        return path
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_FILE}). Pass a checkpoint-<step> "
            "folder written by this script, or 'latest'."
        )
    return path


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so the rename publishes complete data."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


def fsync_dir(folder: str | os.PathLike) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_checkpoint(temp: Path, final: Path, state: TrainerState) -> None:
    """Main process: write the state file, flush, and rename `temp` to `final` atomically."""
    (temp / STATE_FILE).write_text(state.to_json())
    fsync_tree(temp)
    if final.exists():  # the same step saved again (a resumed run): replace it
        stale = final.with_name(final.name + ".old")
        os.rename(final, stale)
        os.rename(temp, final)
        shutil.rmtree(stale)
    else:
        os.rename(temp, final)
    fsync_dir(final.parent)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: TrainerState) -> Path:
    """Every process calls this (each writes its own state files)."""
    root = Path(output_dir)
    temp, final = root / f"{TEMP_PREFIX}{state.global_step}", root / f"checkpoint-{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_checkpoint(temp, final, state)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (main process only). Returns what was deleted."""
    if not keep or keep < 1:
        return []
    removed = [path for _, path in list_checkpoints(output_dir)[:-keep]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("Deleted %s (--save_total_limit %d).", path, keep)
    return removed


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> None:
    """Left-overs of a crash while saving (main process only)."""
    root = Path(output_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(TEMP_PREFIX):
            logger.warning("Removing %s, an incomplete checkpoint from an interrupted save.", child)
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.endswith(".old") and CHECKPOINT_PATTERN.match(child.name.removesuffix(".old")):
            final = child.with_name(child.name.removesuffix(".old"))
            if final.exists():  # the replacement was published: the old copy is garbage
                shutil.rmtree(child, ignore_errors=True)
            else:  # interrupted between the two renames: the old copy is the complete one
                os.rename(child, final)


def load_checkpoint(accelerator, path: str | os.PathLike) -> TrainerState:
    accelerator.load_state(str(path))
    return TrainerState.from_file(Path(path) / STATE_FILE)


__all__ = [
    "STATE_FILE", "TrainerState", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "prune_checkpoints",
    "remove_incomplete_checkpoints", "resolve_resume_path", "save_checkpoint",
]
