"""Shared pytest fixtures. Each block below is self-contained; add new fixtures in their own block."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------------------------
# Local Hub: a real HTTP server speaking the Hub protocol (tests/hub_server.py).
# `local_hub` points huggingface_hub and transformers at it for one test; `local_hub.env` is the
# environment to hand to subprocesses (`subprocess.run(..., env=local_hub.env)`).
# ---------------------------------------------------------------------------------------------
sys.path.insert(0, str(Path(__file__).parent))  # `import hub_server` from any test
from hub_server import LocalHub  # noqa: E402

HUB_TOKEN = "hf_local_test_token"
HUB_USER = "test-user"


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    with LocalHub(tokens={HUB_TOKEN: HUB_USER}, root=tmp_path_factory.mktemp("hub_repos")) as hub:
        yield hub


class HubSession:
    """What a test needs to talk to the local hub: endpoint, token, user, env for subprocesses."""

    def __init__(self, server: LocalHub, env: dict[str, str], hf_home: Path):
        self.server, self.env, self.hf_home = server, env, hf_home
        self.endpoint, self.token, self.user = server.endpoint, HUB_TOKEN, HUB_USER


@pytest.fixture
def local_hub(hub_server, tmp_path_factory, monkeypatch):
    """Point huggingface_hub (already imported: its constants were read at import time) and
    transformers at the local hub, with an isolated HF_HOME and no xet / offline mode."""
    import huggingface_hub.hf_api
    from huggingface_hub import constants

    hf_home = tmp_path_factory.mktemp("hf_home")
    settings = {
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_TOKEN": HUB_TOKEN,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    patched = {
        "ENDPOINT": hub_server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    # Objects built at import time with the old endpoint.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub_server.endpoint)
    try:
        import transformers.utils.hub as transformers_hub

        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt lazily with the new endpoint
    except ImportError:
        pass
    hub_server.clear_failures()
    yield HubSession(hub_server, dict(os.environ), hf_home)
    hub_server.clear_failures()


# ---------------------------------------------------------------------------------------------
# One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("single_torch_thread")`):
# on busy shared CPU cores torch's default of one thread per core runs tiny models many times slower.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
