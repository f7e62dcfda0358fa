"""Crash-safe training checkpoints: `checkpoint-<step>` folders written by `accelerator.save_state`.

A checkpoint is written into `.tmp-checkpoint-<step>`, flushed to disk, and renamed into place:
the rename is atomic, so a folder named `checkpoint-<step>` is always complete, and a crash while
writing leaves the previous checkpoint as the latest. `trainer_state.json` inside it records where
the run stood (step, epoch, position in the epoch), which `save_state` does not.

Resuming runs no code from the folder: the model is safetensors, accelerate reads the optimiser and RNG
files with `weights_only=True`, and the other state (the LR scheduler, PeCo's discriminator and its
optimiser) is saved here as `extra-<name>.safetensors` (modules) or `extra-<name>.pt` read with
`weights_only=True`, never through accelerate's `register_for_checkpointing`, whose
`custom_checkpoint_<i>.pkl` files are unpickled with `weights_only=False`.

Trust: each checkpoint carries `checksums.json` (SHA-256 of its files, `hf_mim.checksums`), checked with
the sizes and CRCs of its files before it is resumed from. A damaged newest checkpoint gives way to the
newest intact older one; when none is intact the run stops (`UntrustedCheckpointError`) instead of
starting afresh over the only copy of the work. Each checkpoint also holds `config.json` and the image
processor (see `save_checkpoint`), so that it loads as a model with the Auto classes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checksums import manifest_entries, manifest_problems, read_manifest, write_manifest

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
EXTRA_PREFIX = "extra-"


@dataclass
class TrainerState:
    """Where a run stands: optimiser steps done, the epoch, and the micro-batches of that epoch consumed."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    skipped_images: int = 0  # unreadable images drawn (and replaced) so far
    # The micro-batch losses summed since step 0 and their count: train_loss of the whole run across resumes.
    train_loss_sum: float = 0.0
    train_loss_batches: int = 0
    # The settings that fix the data order; resuming with others cannot continue exactly.
    num_processes: int = 1
    per_device_train_batch_size: int = 0
    gradient_accumulation_steps: int = 1
    # What the training data was (`hf_mim.data_fingerprint`): a resume names any change.
    data_fingerprint: dict = field(default_factory=dict)

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


class UntrustedCheckpointError(ValueError):
    """Every checkpoint of an output folder is damaged or altered: resuming from none, and starting afresh
    would overwrite them."""


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint whose files are intact; damaged newer ones are skipped with a warning.
    None when there is no checkpoint; UntrustedCheckpointError when there are some but none is intact."""
    checkpoints = list_checkpoints(output_dir)
    damaged = []
    for index in range(len(checkpoints) - 1, -1, -1):
        path = checkpoints[index][1]
        damage = find_damage(path)
        if damage is None:
            return path
        damaged.append((path, damage))
        older = f"falling back to the older {checkpoints[index - 1][1].name}" if index else "no older one"
        logger.warning("Skipping the damaged checkpoint %s (%s); %s.", path, damage, older)
    if damaged:
        raise UntrustedCheckpointError(untrusted_message(output_dir, damaged))
    return None


def untrusted_message(output_dir, damaged: list[tuple[Path, str]]) -> str:
    listing = "; ".join(f"{path.name} ({damage})" for path, damage in damaged)
    newest = damaged[0][0]
    return (f"No checkpoint in {output_dir} can be trusted: {listing}. The run stops here rather than start afresh "
            f"and overwrite them. Restore the files (`python -m hf_mim.verify {output_dir}` lists them), or, to "
            f"start afresh anyway, move them aside (`mv {newest} {newest}.damaged`) or pass another --output_dir.")


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
    damage = find_damage(path)
    if damage is not None:
        raise ValueError(f"--resume_from_checkpoint {path} is damaged ({damage}). Pass an older checkpoint-<step>, "
                         "or 'latest' (the newest intact one).")
    return path


# ---------------------------------------------------------------------------------------------
# Damage: truncated or corrupted files (a full disk, a copy that stopped, bit rot)
# ---------------------------------------------------------------------------------------------


def find_damage(folder: str | os.PathLike, recursive: bool = True) -> str | None:
    """What is wrong with the first damaged file of a checkpoint folder (`recursive=False`: of its top level
    only, a saved model), or None. Reads the sizes that safetensors headers promise, the CRCs of torch.save
    archives and the JSON files (nothing is unpickled), then the SHA-256 of every file its checksums.json
    lists (a flipped bit, a replaced file). A listed archive's CRCs are not read: its SHA-256 covers every byte."""
    folder = Path(folder)
    try:
        listed = read_manifest(folder) or {}
    except ValueError:
        listed = {}  # said by manifest_problems below
    for path in manifest_entries(folder, recursive):  # checksums.json itself: manifest_problems below
        problem = file_damage(path, check_crc=path.relative_to(folder).as_posix() not in listed)
        if problem is not None:
            return f"{path.name}: {problem}"
    problems = manifest_problems(folder)
    return "; ".join(problems) if problems else None


def file_damage(path: Path, check_crc: bool = True) -> str | None:
    try:
        if path.suffix == ".safetensors":
            return safetensors_damage(path)
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            return torch_archive_damage(path, check_crc)
        if path.suffix == ".json":
            json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"unreadable ({type(error).__name__}: {error})"
    return None


def safetensors_damage(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        header_size = int.from_bytes(prefix, "little")
        if 8 + header_size > size:
            return f"truncated: {size} bytes, the header alone needs {8 + header_size}"
        header = json.loads(handle.read(header_size))
    data_size = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_size + data_size != size:
        return f"truncated: {size} bytes, its header describes {8 + header_size + data_size}"
    return None


def torch_archive_damage(path: Path, check_crc: bool = True) -> str | None:
    """torch.save writes a zip archive with a CRC per entry (`check_crc`: read them all, the whole file)."""
    if not zipfile.is_zipfile(path):
        return "truncated or not a torch.save archive"
    if not check_crc:
        return None
    with zipfile.ZipFile(path) as archive:
        corrupt = archive.testzip()
    return None if corrupt is None else f"corrupt entry {corrupt}"


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
    """Main process: write the state file and the checksums, flush, and rename `temp` to `final` atomically."""
    (temp / STATE_FILE).write_text(state.to_json())
    write_manifest(temp)
    fsync_tree(temp)
    if final.exists():  # the same step saved again (a resumed run): replace it
        stale = final.with_name(final.name + ".old")
        os.rename(final, stale)
        os.rename(temp, final)
        shutil.rmtree(stale)
    else:
        os.rename(temp, final)
    fsync_dir(final.parent)


def extra_state_path(folder: Path, name: str, stateful) -> Path:
    suffix = "safetensors" if isinstance(stateful, torch.nn.Module) else "pt"
    return folder / f"{EXTRA_PREFIX}{name}.{suffix}"


def save_extra_state(folder: Path, extras: dict[str, object]) -> None:
    """Objects with `state_dict()` (identical on every process; the main process writes them)."""
    for name, stateful in extras.items():
        path = extra_state_path(folder, name, stateful)
        if isinstance(stateful, torch.nn.Module):
            save_file({key: value.detach().contiguous() for key, value in stateful.state_dict().items()}, path)
        else:
            torch.save(stateful.state_dict(), path)


def load_extra_state(folder: Path, extras: dict[str, object]) -> None:
    """The counterpart of `save_extra_state`: safetensors, or `torch.load(weights_only=True)` (no code runs)."""
    for name, stateful in extras.items():
        path = extra_state_path(folder, name, stateful)
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {path.name} (the state of the {name}): it was written by "
                                    "another version or another --method. Resume from a matching checkpoint.")
        if isinstance(stateful, torch.nn.Module):
            stateful.load_state_dict(load_file(path, device=str(next(stateful.parameters()).device)))
        else:
            stateful.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: TrainerState,
                    extras: dict[str, object] | None = None,
                    save_model_files: Callable[[Path], None] | None = None) -> Path:
    """Every process calls this (each writes its own state files). `extras`: further objects with a
    state_dict (the scheduler, a discriminator ...), saved without pickle, see the module docstring.
    `save_model_files(folder)`: the main process writes what makes the folder a model (config.json, the
    image processor) beside accelerate's model.safetensors."""
    root = Path(output_dir)
    temp, final = root / f"{TEMP_PREFIX}{state.global_step}", root / f"checkpoint-{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temp))
        if accelerator.is_main_process:
            save_extra_state(temp, extras or {})
            if save_model_files is not None:
                save_model_files(temp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish_checkpoint(temp, final, state)
    except Exception as error:
        if not is_disk_full(error, root):
            raise
        shutil.rmtree(temp, ignore_errors=True)  # give the space back; the older checkpoints stay as they are
        kept = [path.name for _, path in list_checkpoints(root)]
        raise OSError(errno.ENOSPC, f"No space left on {root}: {final.name} was not written (kept: "
                                    f"{', '.join(kept) or 'none'}). Free space or lower --save_total_limit, then "
                                    "re-run the same command to resume.") from error
    accelerator.wait_for_everyone()
    return final


# torch.save reports a full disk as "RuntimeError: unexpected pos", safetensors as its own error type:
# the free space tells what happened.
NEARLY_FULL_BYTES = 64 * 2**20


def is_disk_full(error: BaseException, folder: Path) -> bool:
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any(getattr(item, "errno", None) == errno.ENOSPC or "No space left" in str(item) for item in chain):
        return True
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


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


def load_checkpoint(accelerator, path: str | os.PathLike, extras: dict[str, object] | None = None) -> TrainerState:
    if accelerator._custom_objects:  # accelerate would unpickle their files with weights_only=False
        raise RuntimeError("Objects were registered with accelerator.register_for_checkpointing, whose files are "
                           "unpickled on load (code from the folder runs): pass them as `extras` instead.")
    foreign = sorted(child.name for child in Path(path).glob("custom_checkpoint_*.pkl"))
    if foreign:  # accelerate would refuse them, or unpickle them with weights_only=False
        raise ValueError(f"{path} holds {foreign}: pickles that run code when loaded, which this library never "
                         "writes (an older version, or planted). Remove them if you know where they come from, or "
                         "resume from another checkpoint.")
    warn_about_refused_random_states(Path(path), accelerator.process_index)
    try:
        accelerator.load_state(str(path))
        load_extra_state(Path(path), extras or {})
    except pickle.UnpicklingError as error:  # torch's message advises weights_only=False: the unsafe way out
        raise refused_pickle_error(Path(path), error) from None
    return TrainerState.from_file(Path(path) / STATE_FILE)


def refused_pickle_error(folder: Path, error: pickle.UnpicklingError) -> ValueError:
    """A clear error for a state file holding pickled objects that a safe load (weights_only=True) refuses."""
    found = refused_file(folder)
    where, detail = (folder / found[0], found[1]) if found else (folder, unsupported_global(error))
    return ValueError(
        f"Refused to load {where}: it holds pickled objects that a "
        f"safe load does not allow{f' ({detail})' if detail else ''}; loading them would run code from the folder. "
        "Nothing of it ran. This library never writes such files (an altered or foreign checkpoint): resume from "
        "another checkpoint, or start afresh in another --output_dir."
    )


def unsupported_global(error: Exception) -> str:
    """"GLOBAL io.open" out of torch's message (whose advice, allowlisting it or weights_only=False, is unsafe)."""
    found = re.search(r"Unsupported global: (GLOBAL \S+)", str(error))
    return f"it names {found.group(1)}" if found else ""


def refused_file(folder: Path) -> tuple[str, str] | None:
    """(name, what was refused) of the first torch.save file of `folder` that a safe load refuses (the error
    path only: each file is read again)."""
    from accelerate.utils import load

    for path in sorted(folder.iterdir()):
        # Not judged: RNG files (skipped with a warning), and the Trainer's training_args.bin (never loaded).
        if path.suffix in (".bin", ".pt", ".pth", ".pkl") and not path.name.startswith("random_states") \
                and path.name != "training_args.bin":
            try:
                load(path, map_location="cpu")
            except pickle.UnpicklingError as error:
                return path.name, unsupported_global(error)
    return None


def warn_about_refused_random_states(folder: Path, process_index: int) -> None:
    """accelerate skips an RNG file it cannot load with a line at INFO level; one that holds code deserves more.
    (The RNG state is not needed to resume exactly: every micro-batch is reseeded from its position.)"""
    from accelerate.utils import load

    path = folder / f"random_states_{process_index}.pkl"
    if not path.is_file():
        return
    try:
        load(path)
    except pickle.UnpicklingError as error:
        detail = unsupported_global(error)
        logger.warning("Refused %s: it holds pickled objects that a safe load does not allow (%s), which this "
                       "library never writes (an altered file). Nothing of it ran; the run continues without it "
                       "(every micro-batch is reseeded from its position, so the result is the same).", path,
                       detail or "not plain tensors")
    except Exception as error:  # noqa: BLE001 - damaged in another way: accelerate skips it as well
        logger.warning("Could not read %s (%s: %s); the run continues without it (every micro-batch is reseeded "
                       "from its position).", path, type(error).__name__, error)


__all__ = [
    "STATE_FILE", "TrainerState", "UntrustedCheckpointError", "find_damage", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "prune_checkpoints", "refused_pickle_error", "remove_incomplete_checkpoints",
    "resolve_resume_path", "save_checkpoint",
]
