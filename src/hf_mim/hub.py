"""Publishing a saved hf_mim checkpoint to the Hugging Face Hub (or any endpoint in ``HF_ENDPOINT``).

``publish(model_dir, repo_id)`` checks that the directory is a complete checkpoint (config, weights
and the model code that ``trust_remote_code=True`` needs), writes a model card when there is none,
creates the repository if needed and uploads the folder in one commit with ``HfApi.upload_folder``,
with local absolute paths and the host name taken out of the uploaded copy (``hf_mim.redaction``).
Every failure says what went wrong and how to fix it; a failed upload never touches local files.
"""

from __future__ import annotations

import json
import logging
import re
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from .cards import METHODS, saved_card_inputs, write_model_card
from .checksums import MANIFEST_FILE, write_model_manifest
from .redaction import staged_upload

try:  # the HTTP client under huggingface_hub: httpx2 from 2.x, httpx in 1.x
    from httpx2 import HTTPError as TransportError
except ImportError:
    from httpx import HTTPError as TransportError

logger = logging.getLogger(__name__)

# Training state that may sit beside a checkpoint but does not belong in a published model.
DEFAULT_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/*", "optimizer.pt", "scheduler.pt", "rng_state*.pth",
                           "training_args.bin",  # a pickle of local paths and the host name
                           ".hf_mim.lock"]  # the running run's lock (hf_mim.run_lock)
CONFIG_FILES = ("config.json", "preprocessor_config.json")
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)
TOKEN_HELP = "set HF_TOKEN, run `hf auth login`, or pass --hub_token (token=... in Python)"


class PublishError(RuntimeError):
    """The Hub refused or failed the upload (authentication, permissions, server error)."""


def remote_code_files(model_dir: Path) -> set[str]:
    """The Python files the checkpoint's auto_map entries need, with their sibling imports."""
    needed: set[str] = set()
    for name in CONFIG_FILES:
        path = model_dir / name
        if path.is_file():
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
            for target in auto_map.values():  # "module.Class", a list of them, or {backend: "module.Class"}
                targets = target.values() if isinstance(target, dict) else target
                targets = [targets] if isinstance(targets, str) else targets
                needed.update(f"{t.split('--')[-1].rsplit('.', 1)[0]}.py" for t in targets if t)
    pending = list(needed)
    while pending:  # follow `from .sibling import x` inside the files that exist
        path = model_dir / pending.pop()
        if path.is_file():
            for module in RELATIVE_IMPORT.findall(path.read_text()):
                if f"{module}.py" not in needed:
                    needed.add(f"{module}.py")
                    pending.append(f"{module}.py")
    return needed


def weight_files(model_dir: Path) -> list[str]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return ["model.safetensors.index.json", *sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return ["model.safetensors"]


def check_model_dir(model_dir: str | Path) -> dict:
    """The checkpoint's config; FileNotFoundError naming every missing file and how to produce it."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model_dir {model_dir} is not a directory: pass the folder that "
                                "`model.save_pretrained(...)` wrote.")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: it is not a saved model. Save it with "
                                "`model.save_pretrained(model_dir)` first.")
    config = json.loads((model_dir / "config.json").read_text())
    missing = [name for name in weight_files(model_dir) if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks the weights {missing}: save the model with "
                                "`model.save_pretrained(model_dir)` (safetensors) before publishing.")
    missing = sorted(name for name in remote_code_files(model_dir) if not (model_dir / name).is_file())
    if missing:
        raise FileNotFoundError(
            f"{model_dir} lacks the model code {missing} named in its auto_map, so the published model "
            "would not load with trust_remote_code=True. Re-save it with hf_mim's `save_pretrained`, "
            "which copies these files."
        )
    return config


def default_card_kwargs(model_dir: Path, config: dict, repo_id: str, revision: str | None) -> dict:
    """What the card can tell from the directory itself."""
    model_type = config.get("model_type", "")
    architecture = (config.get("architectures") or [""])[0]
    encoder_type = (config.get("backbone_config") or {}).get("model_type", model_type)  # a segmenter's backbone
    task = "pretraining"
    if architecture.endswith("ForImageClassification"):
        task = "image-classification"
    elif architecture.endswith("ForSemanticSegmentation"):
        task = "semantic-segmentation"
    return {
        "method": encoder_type.removeprefix("hf_mim_"),
        "model_type": model_type,
        "task": task,
        "config": config,
        "repo_id": repo_id,
        "revision": revision,
        "image_processor": (model_dir / "preprocessor_config.json").is_file(),
        "recipe": {}, "results": {}, "dataset": None, "base_model": None,
        "tokenizer": None, "tokenizer_revision": None,
    }


def ensure_model_card(model_dir: Path, config: dict, repo_id: str, revision: str | None,
                      card_kwargs: dict | None) -> bool:
    """Write README.md when it is missing, or rewrite it when `card_kwargs` are given; True if written.
    A rewrite keeps what the training run recorded (recipe, results, data: `saved_card_inputs`)
    unless `card_kwargs` replace it."""
    if (model_dir / "README.md").is_file() and card_kwargs is None:
        return False
    saved = saved_card_inputs(model_dir)
    kwargs = {**default_card_kwargs(model_dir, config, repo_id, revision), **saved, **(card_kwargs or {})}
    card_kwargs = {**saved, **(card_kwargs or {})}  # a recorded method is not a guess
    if "method" not in (card_kwargs or {}) and kwargs["method"] in METHODS:
        logger.warning("Model card: method %r read from model_type %r; pass card_kwargs={'method': ...} "
                       "(--method) if the checkpoint was trained with another.",
                       kwargs["method"], config.get("model_type"))
    if kwargs["method"] not in METHODS:
        raise ValueError(
            f"Cannot tell the method of model_type {config.get('model_type')!r} for the model card: pass "
            f"card_kwargs={{'method': ...}} (--method), one of {sorted(METHODS)}, or add a README.md yourself."
        )
    write_model_card(model_dir, **kwargs)
    return True


def http_problem(error: Exception) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    return f"HTTP {status}: {error}" if status else f"{type(error).__name__}: {error}"


def publish(
    model_dir: str | Path,
    repo_id: str | None,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload hf_mim model",
    card_kwargs: dict | None = None,
    ignore_patterns: list[str] | None = None,
) -> str:
    """Upload `model_dir` to the Hub repository `repo_id` ("namespace/name") and return its URL.

    `token` defaults to HF_TOKEN / the saved login; `revision` is a branch (created if needed);
    `card_kwargs` are `hf_mim.cards.make_model_card` arguments (recipe, results, dataset, ...): with
    them README.md is (re)written, without them it is written only when missing. Files matching
    `ignore_patterns` (default: training state such as checkpoint-* folders and optimizer.pt) are
    left out, and the log says which.
    """
    if not repo_id:
        raise ValueError("No Hub repository id: pass --repo_id NAMESPACE/NAME (repo_id=... in Python; "
                         "--hub_model_id in the training scripts).")
    token = token or get_token()
    if not token:
        raise PublishError(f"No Hugging Face token to upload {repo_id} with: {TOKEN_HELP}.")
    model_dir = Path(model_dir)
    config = check_model_dir(model_dir)
    wrote_card = ensure_model_card(model_dir, config, repo_id, revision, card_kwargs)
    intact = f"Your local files in {model_dir} are intact" + (" (the model card was written to README.md)"
                                                            if wrote_card else "")
    ignore_patterns = DEFAULT_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns
    local_files = [p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()]
    skipped = sorted(f for f in local_files if any(fnmatch(f, pattern) for pattern in ignore_patterns))
    if skipped:
        logger.warning("Not uploading training-state files %s (ignore_patterns=%s).", skipped, ignore_patterns)

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with staged_upload(model_dir, [name for name in local_files if name not in skipped]) as staged:
            if (staged / MANIFEST_FILE).is_file():  # of the copy: redaction may have rewritten a listed file
                write_model_manifest(staged)
            commit = api.upload_folder(repo_id=repo_id, folder_path=staged, commit_message=commit_message,
                                       revision=revision)  # no local paths or host name (see redaction.py)
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise PublishError(f"The Hub rejected the token for {repo_id} ({http_problem(error)}). Use a token "
                               f"with write access: {TOKEN_HELP}.") from error
        raise PublishError(
            f"Publishing {model_dir} to {repo_id} failed ({http_problem(error)}). {intact}; re-run the same "
            "command to retry (files already on the Hub are skipped)."
        ) from error
    except TransportError as error:  # connection refused, timeout, ...
        raise PublishError(
            f"Could not reach the Hub at {api.endpoint} while publishing {repo_id} ({http_problem(error)}). "
            f"{intact}; check HF_ENDPOINT and your network, then retry."
        ) from error
    logger.info("Published %s to %s (commit %s).", model_dir, url, commit.oid)
    return f"{url}/tree/{revision}" if revision else str(url)


__all__ = ["PublishError", "check_model_dir", "publish"]
