"""SHA-256 manifests: `checksums.json` beside the files of a checkpoint or a saved model.

safetensors has no checksum: a flipped bit in `model.safetensors` loads silently as a wrong weight. Every
checkpoint (pre-training and fine-tuning) and every saved model carries the SHA-256 of its files, written
once they are complete; resuming checks them (a mismatch makes the checkpoint damaged, see
`hf_mim.training.checkpoints.find_damage`) and `python -m hf_mim.verify DIR` checks them on demand.

A file the manifest lists must exist with that digest; files added later (results, a model card, logs)
are not listed and not judged. A folder without a manifest (written by an older version) is "unverified".
"""

from __future__ import annotations

import hashlib
import json
import os
from fnmatch import fnmatch
from pathlib import Path

MANIFEST_FILE = "checksums.json"
CHUNK = 2**22
# What `save_pretrained` of a model and its image processor write: the files a saved model's manifest covers
# (results, cards and logs are rewritten later; training_args.bin is never uploaded).
MODEL_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "preprocessor_config.json",
                       "*.py")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_entries(folder: Path, recursive: bool) -> list[Path]:
    """The files a manifest of `folder` covers: all of them (checkpoints), or the top level only (a saved
    model, whose folder also holds checkpoint-<step> sub-folders with manifests of their own)."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if path.is_file() and path.name != MANIFEST_FILE)


def write_manifest(folder: str | os.PathLike, recursive: bool = True, patterns: tuple[str, ...] = ("*",)) -> Path:
    """Hash the files of `folder` (those whose names match `patterns`) into `folder/checksums.json`
    (written to a temporary name, then renamed)."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): {"sha256": sha256_of(path), "size": path.stat().st_size}
        for path in manifest_entries(folder, recursive) if any(fnmatch(path.name, pattern) for pattern in patterns)
    }
    target = folder / MANIFEST_FILE
    temporary = target.with_name(f".{MANIFEST_FILE}.tmp")
    temporary.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))
    os.replace(temporary, target)
    return target


def write_model_manifest(folder: str | os.PathLike) -> Path:
    """The manifest of a saved model: its weights, config and image processor (see MODEL_FILE_PATTERNS)."""
    return write_manifest(folder, recursive=False, patterns=MODEL_FILE_PATTERNS)


def read_manifest(folder: str | os.PathLike) -> dict[str, dict] | None:
    """{relative path: {"sha256", "size"}}, or None without a manifest. Raises ValueError if it is unreadable."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError(f"unknown layout (algorithm {manifest.get('algorithm')!r})")
        return files
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{MANIFEST_FILE} is unreadable ({error})") from error


def manifest_problems(folder: str | os.PathLike) -> list[str] | None:
    """What differs from the manifest ("name: what"), [] if every listed file is intact, None without one."""
    folder = Path(folder)
    try:
        files = read_manifest(folder)
    except ValueError as error:
        return [str(error)]
    if files is None:
        return None
    problems = []
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing (listed in {MANIFEST_FILE})")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name}: changed since it was written ({path.stat().st_size} bytes, {MANIFEST_FILE} "
                            f"says {expected['size']})")
        elif sha256_of(path) != expected["sha256"]:
            problems.append(f"{name}: changed since it was written (its SHA-256 differs from {MANIFEST_FILE})")
    return problems


__all__ = ["MANIFEST_FILE", "manifest_problems", "read_manifest", "sha256_of", "write_manifest", "write_model_manifest"]
