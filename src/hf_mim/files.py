"""File permissions of saved models.

transformers' `save_pretrained` writes weights through a temporary file (`tempfile.mkstemp`, mode 0600)
renamed into place, so `model.safetensors` was the one file of an output folder that the group and
others could not read. `apply_umask` gives such files the mode every other file gets (0666 less the umask).
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    umask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(umask)
    return umask


def apply_umask(folder: str | os.PathLike, pattern: str = "*.safetensors") -> None:
    """chmod the files matching `pattern` directly in `folder` to 0666 & ~umask (as open() creates files)."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).glob(pattern):
        if path.is_file() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)


__all__ = ["apply_umask"]
