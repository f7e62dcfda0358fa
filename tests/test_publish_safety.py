"""Fail before training, and publish what was run without the machine it ran on: `pretrain.py
--push_to_hub` without a token and a missing tokenizer folder stop before any step; a pushed repo
holds the results files, no local absolute path and no host name; the weights get the same file
mode as every other file."""

from __future__ import annotations

import json
import re
import socket
import stat
from pathlib import Path

import pytest
from huggingface_hub import constants

from hf_mim.data import load_digits_dataset
from hf_mim.pretraining import main
from hf_mim.redaction import redact_text

FAST = ["--max_train_samples", "48", "--per_device_train_batch_size", "16", "--no-do_eval", "--logging_steps", "1",
        "--report_to", "none", "--dataloader_num_workers", "0"]


def test_push_without_a_token_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match="--push_to_hub: no Hugging Face token to upload me/mae"):
        main(["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--push_to_hub", "--hub_model_id", "me/mae",
              *FAST])
    assert not (tmp_path / "out").exists()  # refused while parsing: nothing was loaded or trained


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_a_missing_tokenizer_folder_is_named_as_such(tmp_path, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = str(tmp_path / "dvae") if where == "absolute" else "outputs/runs/dvae"
    with pytest.raises(FileNotFoundError, match=f"--tokenizer {re.escape(folder)}: no such folder"):
        main(["--method", "beit", "--tokenizer", folder, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
              *FAST])


def test_redaction_keeps_urls_and_fractions():
    text = "data: parquet:/tmp/a/train.parquet, https://huggingface.co/x/y, 1/4 and/or imagefolder:/home/train/"
    assert redact_text(text, ["myhost"]) == "data: parquet:train.parquet, https://huggingface.co/x/y, 1/4 and/or " \
                                            "imagefolder:train"
    assert redact_text("ran on myhost.", ["myhost"]) == "ran on <host>."


def test_pushed_repo_carries_results_and_no_local_paths_or_host_name(local_hub, tmp_path):
    from huggingface_hub import snapshot_download

    train_file = tmp_path / "private-data" / "train.parquet"
    train_file.parent.mkdir()
    load_digits_dataset().select(range(48)).to_parquet(str(train_file))
    output_dir, repo_id = tmp_path / "mae", f"{local_hub.user}/mae-private"
    main(["--output_dir", str(output_dir), "--max_steps", "2", "--train_file", str(train_file), *FAST])
    assert str(train_file) in (output_dir / "README.md").read_text()  # locally, the card says where the data was
    main(["--output_dir", str(output_dir), "--max_steps", "3", "--train_file", str(train_file), "--push_to_hub",
          "--hub_model_id", repo_id, *FAST])  # resumes (log.jsonl records the folder), then pushes
    snapshot = Path(snapshot_download(repo_id))
    files = {path.relative_to(snapshot).as_posix(): path for path in snapshot.rglob("*") if path.is_file()}
    assert {"all_results.json", "train_results.json", "README.md", "model.safetensors", "log.jsonl"} <= set(files)
    assert json.loads(files["all_results.json"].read_text())["train_steps"] == 3
    host = socket.gethostname()
    for name, path in files.items():
        assert host not in re.split(r"[./_-]", name), name
        if path.suffix in (".json", ".jsonl", ".md", ".txt"):
            text = path.read_text()
            assert str(tmp_path) not in text and "/tmp/" not in text, name
            assert not re.search(rf"(?<![\w-]){re.escape(host)}(?![\w-])", text), name
    assert "parquet:train.parquet" in files["README.md"].read_text()
    assert (output_dir / "log.jsonl").read_text().count(str(output_dir)) >= 1  # local files untouched
    modes = {name: stat.S_IMODE((output_dir / name).stat().st_mode) for name in ("model.safetensors", "config.json")}
    assert modes["model.safetensors"] == modes["config.json"], modes
