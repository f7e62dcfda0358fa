"""What leaves the machine on a push carries no local absolute paths and no host name.

Training writes local details into the files of a run: the data set as `parquet:/home/me/data/...`
in the model card, a teacher's folder in config.json, `"from": "/scratch/..."` in log.jsonl, the host
name in tensorboard event file names. `staged_upload` builds the folder that is uploaded: text files
with every absolute path of this machine replaced by its last component (`/home/me/data/x.parquet`
-> `x.parquet`) and the host name by `<host>`; files whose name holds the host name are left out.
The local files are never changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".csv")
# An absolute POSIX path: a "/" after no word character or "/" (fractions stay), not "//" (URLs stay).
ABSOLUTE_PATH = re.compile(r"(?<![\w/.~-])/(?!/)(?:[\w.@+=,-]+/)*[\w.@+=,-]+/?")
HOST_PLACEHOLDER = "<host>"


def host_names() -> list[str]:
    names = {socket.gethostname(), socket.gethostname().split(".")[0]}
    return sorted((name for name in names if len(name) >= 2 and name != "localhost"), key=len, reverse=True)


def is_local_path(path: str) -> bool:
    """A path whose top folder exists here (/home, /tmp, /work ...), not some text with slashes."""
    top = path.strip("/").split("/")[0]
    return bool(top) and os.path.isdir("/" + top)


def redact_text(text: str, hosts: list[str]) -> str:
    def shorten(match: re.Match) -> str:
        path = match.group(0)
        return os.path.basename(path.rstrip("/")) or path if is_local_path(path) else path

    text = ABSOLUTE_PATH.sub(shorten, text)
    for host in hosts:
        text = re.sub(rf"(?<![\w-]){re.escape(host)}(?![\w-])", HOST_PLACEHOLDER, text)
    return text


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # large weights: no second copy on disk
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def staged_upload(model_dir: Path, files: list[str]) -> Iterator[Path]:
    """A temporary folder holding `files` (relative to `model_dir`) as they are to be uploaded."""
    hosts = host_names()
    left_out = [name for name in files if set(re.split(r"[./_-]", name)) & set(hosts)]
    if left_out:
        logger.warning("Not uploading %s: their names hold this machine's host name.", left_out)
    with tempfile.TemporaryDirectory(prefix=".hf_mim-upload-", dir=model_dir) as staging:
        for name in files:
            if name in left_out:
                continue
            source, target = model_dir / name, Path(staging) / name
            if source.suffix in TEXT_SUFFIXES:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(redact_text(source.read_text(errors="replace"), hosts))
            else:
                link_or_copy(source, target)
        yield Path(staging)


__all__ = ["redact_text", "staged_upload"]
