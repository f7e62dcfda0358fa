"""Publishing to a real (local) Hub server and loading back, with and without hf_mim installed.

The server (tests/hub_server.py) speaks the Hub's HTTP protocol; huggingface_hub and transformers
talk to it through their normal code paths, so these tests exercise the real upload and download.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoModelForPreTraining

from hf_mim.hub import PublishError, publish
from hf_mim.models import MaeConfig, MaeForPreTraining

ROOT = Path(__file__).resolve().parents[1]
PROCESSOR_MODULE = "hf_mim.models.image_processing_mim"


def tiny_config() -> MaeConfig:
    return MaeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                     decoder_intermediate_size=64, image_size=32, patch_size=8)


def save_image_processor(model_dir: Path) -> str | None:
    """Save hf_mim's image processor beside the model when that module exists (another part of the project)."""
    if importlib.util.find_spec(PROCESSOR_MODULE) is None:
        return None
    module = importlib.import_module(PROCESSOR_MODULE)
    name = next(n for n in getattr(module, "__all__", dir(module)) if n.endswith("ImageProcessor"))
    getattr(module, name)().save_pretrained(model_dir)
    return name


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(tmp_path) -> Path:
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "inputs.pt"
    torch.save({"pixel_values": torch.randn(2, 3, 32, 32, generator=generator),
                "noise": torch.rand(2, 16, generator=generator)}, path)
    return path


@pytest.fixture
def tiny_model(tmp_path, inputs):
    """(model, its save_pretrained directory, its measured loss on `inputs`, processor class or None)."""
    torch.manual_seed(0)
    model = MaeForPreTraining(tiny_config()).eval()
    model_dir = tmp_path / "tiny-mae"
    model.save_pretrained(model_dir)
    processor = save_image_processor(model_dir)
    with torch.no_grad():
        loss = model(**torch.load(inputs)).loss.item()
    return model, model_dir, loss, processor


def reference_logits(model: MaeForPreTraining, inputs: Path) -> torch.Tensor:
    with torch.no_grad():
        return model(**torch.load(inputs)).logits


LOAD_SCRIPT = """
import sys, torch
{block}
from transformers import AutoModelForPreTraining
model = AutoModelForPreTraining.from_pretrained({repo_id!r}{extra}).eval()
with torch.no_grad():
    logits = model(**torch.load({inputs!r})).logits
torch.save({{"logits": logits, "module": type(model).__module__}}, {out!r})
{processor}
"""


def load_in_subprocess(local_hub, tmp_path, repo_id, inputs, *, without_package: bool, processor: str | None):
    """Load `repo_id` in a fresh interpreter (cwd outside the repository); its logits and model module."""
    out = tmp_path / f"loaded_{without_package}.pt"
    extra = ", trust_remote_code=True" if without_package else ""
    processor_code = ""
    if processor:
        processor_code = (f"from transformers import AutoImageProcessor\n"
                          f"p = AutoImageProcessor.from_pretrained({repo_id!r}{extra})\n"
                          f"assert type(p).__name__.startswith({processor!r}), type(p)\n")
    block = "sys.modules['hf_mim'] = None  # hf_mim cannot be imported" if without_package else "import hf_mim"
    script = LOAD_SCRIPT.format(block=block, repo_id=repo_id, extra=extra, inputs=str(inputs), out=str(out),
                                processor=processor_code)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=local_hub.env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def test_publish_then_load_with_and_without_the_package(local_hub, tiny_model, inputs, tmp_path):
    model, model_dir, loss, processor = tiny_model
    repo_id = f"{local_hub.user}/tiny-mae"
    url = publish(model_dir, repo_id, card_kwargs={
        "recipe": {"mask_ratio": 0.75, "seed": 0}, "results": {"eval_loss": loss}, "dataset": "synthetic-noise"})
    assert url == f"{local_hub.endpoint}/{repo_id}"
    expected = reference_logits(model, inputs)

    with_package = load_in_subprocess(local_hub, tmp_path, repo_id, inputs, without_package=False, processor=processor)
    assert with_package["module"] == "hf_mim.models.modeling_mae"
    torch.testing.assert_close(with_package["logits"], expected, rtol=0, atol=1e-6)

    remote = load_in_subprocess(local_hub, tmp_path, repo_id, inputs, without_package=True, processor=processor)
    assert remote["module"].startswith("transformers_modules."), remote["module"]  # the repository's own code
    torch.testing.assert_close(remote["logits"], expected, rtol=0, atol=1e-6)

    # Every local file (the card included) arrived unchanged, plus the repository's .gitattributes.
    snapshot = Path(snapshot_download(repo_id))
    assert file_bytes(snapshot) == {**file_bytes(model_dir), ".gitattributes": file_bytes(snapshot)[".gitattributes"]}
    assert {"config.json", "model.safetensors", "modeling_mae.py", "vit_core.py", "README.md"} <= set(
        file_bytes(snapshot))

    card = ModelCard.load(repo_id)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results] == [
        ("eval_loss", loss, "synthetic-noise")]

    # Publishing again with no change makes no new commit; pushing with transformers keeps our card.
    history = local_hub.server.repo(repo_id).history()
    publish(model_dir, repo_id)
    assert local_hub.server.repo(repo_id).history() == history
    model.push_to_hub(repo_id)
    assert ModelCard.load(repo_id).data.eval_results[0].metric_value == loss


def test_push_to_hub_directly(local_hub, tiny_model, inputs):
    model, _, _, _ = tiny_model
    repo_id = f"{local_hub.user}/tiny-mae-push"
    model.push_to_hub(repo_id)
    pushed = set(file_bytes(Path(snapshot_download(repo_id))))
    assert {"config.json", "model.safetensors", "modeling_mae.py", "configuration_mae.py", "vit_core.py"} <= pushed
    loaded = AutoModelForPreTraining.from_pretrained(repo_id).eval()
    torch.testing.assert_close(reference_logits(loaded, inputs), reference_logits(model, inputs), rtol=0, atol=0)


def test_publish_to_a_branch_leaves_main_alone(local_hub, tiny_model):
    _, model_dir, _, _ = tiny_model
    repo_id = f"{local_hub.user}/tiny-mae-branch"
    url = publish(model_dir, repo_id, revision="experiment")
    assert url.endswith(f"/{repo_id}/tree/experiment")
    repo = local_hub.server.repo(repo_id)
    assert set(repo.files(repo.resolve("main"))) == {".gitattributes"}
    assert "model.safetensors" in repo.files(repo.resolve("experiment"))
    assert 'revision="experiment"' in (model_dir / "README.md").read_text()


def test_server_error_during_upload_is_clear_and_leaves_local_files_intact(local_hub, tiny_model):
    _, model_dir, _, _ = tiny_model
    repo_id = f"{local_hub.user}/tiny-mae-500"
    publish(model_dir, repo_id)  # first publish writes README.md
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + "\n")  # something to commit
    before = file_bytes(model_dir)
    history = local_hub.server.repo(repo_id).history()
    local_hub.server.fail_next("commit", status=500)
    with pytest.raises(PublishError, match="500") as error:
        publish(model_dir, repo_id)
    assert repo_id in str(error.value) and "local files" in str(error.value) and "intact" in str(error.value)
    assert file_bytes(model_dir) == before
    assert local_hub.server.repo(repo_id).history() == history  # nothing committed
    publish(model_dir, repo_id)  # the advertised retry works
    assert len(local_hub.server.repo(repo_id).history()) == len(history) + 1


def test_unreachable_hub_is_clear(local_hub, tiny_model, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    _, model_dir, _, _ = tiny_model
    with pytest.raises(PublishError, match="Could not reach the Hub") as error:
        publish(model_dir, f"{local_hub.user}/unreachable")
    assert dead in str(error.value) and "HF_ENDPOINT" in str(error.value)
    assert "model card was written to README.md" in str(error.value)


def test_missing_or_wrong_token_is_clear(local_hub, tiny_model, monkeypatch):
    _, model_dir, _, _ = tiny_model
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="No Hugging Face token") as error:
        publish(model_dir, f"{local_hub.user}/no-token")
    for hint in ("HF_TOKEN", "hf auth login", "--hub_token"):
        assert hint in str(error.value)
    with pytest.raises(PublishError, match="rejected the token") as error:
        publish(model_dir, f"{local_hub.user}/wrong-token", token="hf_not_a_real_token")
    assert "401" in str(error.value) and "HF_TOKEN" in str(error.value)
    assert ("model", f"{local_hub.user}/wrong-token") not in local_hub.server.repos


def test_missing_repo_id_is_clear(local_hub, tiny_model, capsys):
    _, model_dir, _, _ = tiny_model
    with pytest.raises(ValueError, match="--repo_id"):
        publish(model_dir, None)
    publish_cli = load_publish_cli()
    assert publish_cli.main(["--model_dir", str(model_dir)]) == 2
    assert "--repo_id" in capsys.readouterr().err


@pytest.mark.parametrize("remove, message", [
    ("model.safetensors", "lacks the weights"),
    ("vit_core.py", r"lacks the model code \['vit_core.py'\]"),
    ("config.json", "no config.json"),
])
def test_incomplete_model_dir_is_refused_before_any_request(local_hub, tiny_model, remove, message):
    _, model_dir, _, _ = tiny_model
    (model_dir / remove).unlink()
    requests_before = len(local_hub.server.requests)
    with pytest.raises(FileNotFoundError, match=message):
        publish(model_dir, f"{local_hub.user}/incomplete")
    assert len(local_hub.server.requests) == requests_before


def load_publish_cli():
    spec = importlib.util.spec_from_file_location("publish_cli", ROOT / "examples" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_cli_with_card_options(local_hub, tiny_model, tmp_path, capsys):
    _, model_dir, loss, _ = tiny_model
    results = tmp_path / "eval_results.json"
    results.write_text(f'{{"eval_loss": {loss}, "eval_runtime": 0.5}}')
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"learning_rate": 0.00015, "mask_ratio": 0.75}')
    repo_id = f"{local_hub.user}/tiny-mae-cli"
    code = load_publish_cli().main([
        "--model_dir", str(model_dir), "--hub_model_id", repo_id, "--hub_private_repo", "--dataset", "synthetic-noise",
        "--results", str(results), "--result_keys", "eval_loss", "--recipe", str(recipe), "--license", "mit"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == f"{local_hub.endpoint}/{repo_id}"
    assert local_hub.server.repo(repo_id).private
    card = ModelCard.load(repo_id)
    assert card.data.license == "mit"
    assert [r.metric_type for r in card.data.eval_results] == ["eval_loss"]  # runtime left out as asked
    assert "| `learning_rate` | `0.00015` |" in card.text


def test_refresh_card_for_another_repo_keeps_the_runs_recipe_and_results(local_hub, tiny_model, tmp_path):
    _, model_dir, loss, _ = tiny_model
    (tmp_path / "results.json").write_text(f'{{"eval_loss": {loss}}}')
    (tmp_path / "recipe.json").write_text('{"learning_rate": 0.00015}')
    first, second = f"{local_hub.user}/tiny-mae-first", f"{local_hub.user}/tiny-mae-renamed"
    cli = load_publish_cli()
    assert cli.main(["--model_dir", str(model_dir), "--repo_id", first, "--dataset", "uoft-cs/cifar10",
                     "--results", str(tmp_path / "results.json"), "--recipe", str(tmp_path / "recipe.json")]) == 0
    assert cli.main(["--model_dir", str(model_dir), "--repo_id", second, "--refresh_card"]) == 0
    card = ModelCard.load(second)
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("eval_loss", loss)]
    assert card.data.datasets == ["uoft-cs/cifar10"] and "custom_code" in card.data.tags
    assert "| `learning_rate` | `0.00015` |" in card.text and f'from_pretrained("{second}"' in card.text


def test_publish_cli_help_names_the_hub_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_publish_cli().main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model_dir", "--repo_id", "--hub_model_id", "--hub_token", "--hub_private_repo", "--hub_revision",
                 "--results", "--recipe", "HF_TOKEN"):
        assert flag in help_text


def test_local_hub_speaks_the_protocol_huggingface_hub_expects(local_hub, tmp_path):
    """The test server itself: history, deletions, refs, privacy and the Hub's error codes."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    api, repo_id = HfApi(), f"{local_hub.user}/protocol"
    api.create_repo(repo_id, private=True)
    with pytest.raises(HfHubHTTPError, match="409"):
        api.create_repo(repo_id)  # exists; exist_ok=False
    first = api.upload_file(path_or_fileobj=b"one", path_in_repo="a/x.txt", repo_id=repo_id, commit_message="add x")
    second = api.delete_file("a/x.txt", repo_id, commit_message="remove x")
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][:2] == [second.oid, first.oid]
    assert all(len(sha) == 40 for sha in local_hub.server.repo(repo_id).history())
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    assert Path(hf_hub_download(repo_id, "a/x.txt", revision=first.oid)).read_bytes() == b"one"
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "a/x.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without the owner's token
        api.model_info(repo_id, token=False)
    with pytest.raises(HfHubHTTPError, match="401"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="y", repo_id=repo_id, token=False)
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\n- not a mapping\n---\n", path_in_repo="README.md", repo_id=repo_id)
