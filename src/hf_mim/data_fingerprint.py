"""What the training data was, recorded in every checkpoint: a resume names any change.

Cheap by design (no image is read): for local folders and parquet files, the number of files, their total
size and a SHA-256 over (path, size, modification time) of each; for every map-style split its number of
rows; for a Hub data set, datasets' own fingerprint of the loaded split (it follows the files' revision).
The embedded digits and streams get their source and size only.
"""

from __future__ import annotations

import hashlib
import logging
import os

import datasets

from .data import DIGITS_SOURCE, ImageDatasets, expand_files

logger = logging.getLogger(__name__)


def local_files(train_dir=None, train_file=None) -> list[str]:
    """The training files of a local source, sorted: every file under `train_dir`, or the files `train_file`
    expands to (`hf_mim.data.expand_files`, as the data were loaded)."""
    if train_dir:
        return sorted(os.path.join(folder, name) for folder, _, names in os.walk(train_dir) for name in names)
    if train_file:
        return expand_files(train_file, "--train_file")
    return []


def listing_fingerprint(files: list[str]) -> dict:
    digest, total = hashlib.sha256(), 0
    for path in files:
        stat = os.stat(path)
        total += stat.st_size
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "listing_sha256": digest.hexdigest()}


def data_fingerprint(data: ImageDatasets, train_dir=None, train_file=None) -> dict:
    """The fingerprint of the training split of `data`, loaded from `train_dir` / `train_file` if local."""
    fingerprint = {"source": data.source}
    if isinstance(data.train, datasets.Dataset):
        fingerprint["rows"] = len(data.train)
        if not (train_dir or train_file) and data.source != DIGITS_SOURCE:  # a Hub data set (a local one: files)
            fingerprint["dataset_fingerprint"] = data.train._fingerprint
    if train_dir or train_file:
        fingerprint.update(listing_fingerprint(local_files(train_dir, train_file)))
    return fingerprint


def data_changes(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty: the same data, as far as it can tell)."""
    if not saved:
        return []  # a checkpoint of an older version: nothing to compare
    changes = []
    if saved.get("source") != current.get("source"):
        changes.append(f"the source was {saved.get('source')}, now {current.get('source')}")
    for key, what in (("files", "files"), ("rows", "training images"), ("bytes", "bytes")):
        if key in saved and key in current and saved[key] != current[key]:
            difference = current[key] - saved[key]
            changes.append(f"{saved[key]} {what} then, {current[key]} now ({difference:+d})")
    if not changes and saved.get("listing_sha256") != current.get("listing_sha256"):
        changes.append("files were replaced or modified (same count and size, other names or modification times)")
    if "dataset_fingerprint" in saved and "dataset_fingerprint" in current and \
            saved["dataset_fingerprint"] != current["dataset_fingerprint"]:
        changes.append("datasets' fingerprint of the split changed (another revision of the data set, or another "
                       "--cache_dir)")
    return changes


def warn_if_data_changed(saved: dict, current: dict, checkpoint) -> list[str]:
    """A warning naming every change since `checkpoint` was written; returns the changes."""
    changes = data_changes(saved, current)
    if changes:
        logger.warning("The training data changed since %s was written: %s. The run continues on the data as it is "
                       "now, so it will not match an uninterrupted run (and the position in the epoch refers to the "
                       "old data); restore the data, or pass --resume_from_checkpoint none to start afresh.",
                       checkpoint, "; ".join(changes))
    return changes


__all__ = ["data_changes", "data_fingerprint", "warn_if_data_changed"]
