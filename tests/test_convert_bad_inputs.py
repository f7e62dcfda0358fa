"""Converters given damaged files: a clear error that says so, and `--allow-pickle` suggested only for
files that really are pickles of objects (the flag cannot repair a truncated download)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_mim.convert.__main__ import main as convert_main

CONVERTERS = ["mae", "beit", "beitv2", "vqkd", "dalle"]


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    """Each kind of damage, and one healthy pickle of objects (a training checkpoint with its args)."""
    weights = {"model": {"cls_token": torch.zeros(1, 1, 8)}}
    torch.save({**weights, "args": argparse.Namespace(lr=1e-3)}, folder / "with_args.pth")
    torch.save(weights, folder / "plain.pth")
    data = (folder / "plain.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    (folder / "garbage.pth").write_bytes(b"<html>404 Not Found</html>")
    (folder / "empty.pth").write_bytes(b"")
    save_file({"cls_token": torch.zeros(1, 1, 8)}, folder / "plain.safetensors")
    tensors = (folder / "plain.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(tensors[:-16])
    return {name: folder / f"{name}" for name in ("with_args.pth", "truncated.pth", "garbage.pth", "empty.pth",
                                                    "truncated.safetensors")}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("converter", CONVERTERS)
@pytest.mark.parametrize("name", ["truncated.pth", "garbage.pth", "empty.pth", "truncated.safetensors"])
def test_damaged_files_are_named_damaged_without_suggesting_pickle(converter, name, bad_inputs, tmp_path, capsys):
    assert convert_main([converter, str(bad_inputs[name]), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert str(bad_inputs[name]) in error and ("damaged" in error or "truncated" in error), error
    assert "--allow-pickle" not in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("converter", CONVERTERS)
def test_a_real_pickle_of_objects_suggests_the_flag(converter, bad_inputs, tmp_path, capsys):
    assert convert_main([converter, str(bad_inputs["with_args.pth"]), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "--allow-pickle" in error and "argparse.Namespace" in error, error
