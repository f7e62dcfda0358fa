"""Check saved models and checkpoints against their checksums: `python -m hf_mim.verify DIR [DIR ...]`.

DIR is a run's --output_dir (its saved model and every checkpoint-<step> in it), one checkpoint, or a
saved model. Each folder gets one line: `ok`, `DAMAGED` (what differs: a file changed since it was written,
truncated or missing) or `unverified` (no checksums.json: written by an older version; its files are still
checked for truncation). Exit status 1 when anything is damaged or missing, else 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checksums import MANIFEST_FILE, read_manifest
from .training.checkpoints import STATE_FILE, find_damage, list_checkpoints


def folders_to_check(root: Path) -> list[Path]:
    """The folder itself when it is a model or a checkpoint, then its checkpoint-<step> sub-folders."""
    own = [root] if (root / MANIFEST_FILE).is_file() or (root / STATE_FILE).is_file() or \
        (root / "config.json").is_file() else []
    return own + [path for _, path in list_checkpoints(root)]


def check_folder(folder: Path) -> tuple[str, str]:
    """(verdict, detail): a checkpoint is checked whole; a saved model's manifest covers its model files."""
    is_checkpoint = (folder / STATE_FILE).is_file()
    try:
        listed = read_manifest(folder)
    except ValueError as error:
        return "DAMAGED", str(error)
    # A saved model: only its own files (the checkpoints below are checked one by one).
    damage = find_damage(folder, recursive=is_checkpoint)
    if damage:
        return "DAMAGED", damage
    if listed is None:
        return "unverified", f"no {MANIFEST_FILE} (written by an older version); no truncated file found"
    return "ok", f"{len(listed)} files match {MANIFEST_FILE}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_mim.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="output folders, checkpoints or saved models")
    args = parser.parse_args(argv)
    damaged = 0
    for root in args.folders:
        if not root.is_dir():
            print(f"{'MISSING':<10} {root}: not a folder", flush=True)
            damaged += 1
            continue
        folders = folders_to_check(root)
        if not folders:
            print(f"{'MISSING':<10} {root}: neither a saved model nor a checkpoint, and it holds no checkpoint-<step>")
            damaged += 1
        for folder in folders:
            verdict, detail = check_folder(folder)
            damaged += verdict == "DAMAGED"
            print(f"{verdict:<10} {folder}: {detail}", flush=True)
    print(f"{damaged} damaged or missing" if damaged else "nothing damaged")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
