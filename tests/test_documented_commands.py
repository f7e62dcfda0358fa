"""Every command the README and the examples' docstrings show parses with its script's real parser:
an option renamed or removed in the code cannot leave a documented command that fails."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from hf_mim.finetuning.arguments import parse_finetuning_args
from hf_mim.finetuning.probe import parse_probe_args
from hf_mim.pretraining.arguments import parse_args as parse_pretraining_args
from hf_mim.segmentation.run import parse_segmentation_args
from hf_mim.tokenizer_training.arguments import parse_args as parse_tokenizer_args

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = r"(?:python|accelerate launch(?: --[-\w=]+(?: \d+)?)*|torchrun(?: --[-\w=]+)*)"
COMMAND = re.compile(LAUNCHER + r" (examples/(\w+)\.py)\b(.*)")


def publish_args(argv: list[str]):
    spec = importlib.util.spec_from_file_location("publish_cli", ROOT / "examples" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser().parse_args(argv)


PARSERS = {
    "pretrain": parse_pretraining_args,
    "train_tokenizer": parse_tokenizer_args,
    "finetune": parse_finetuning_args,
    "probe": parse_probe_args,
    "segment": parse_segmentation_args,
    "publish": publish_args,
}


def code_lines(path: Path) -> list[str]:
    """The README's fenced code, or an example's docstring, with `\\` continuations joined."""
    text = path.read_text()
    if path.suffix == ".md":
        chunks = re.findall(r"^```[\w-]*\n(.*?)^```", text, flags=re.S | re.M)
    else:
        docstring = re.match(r'\s*"""(.*?)"""', text, flags=re.S).group(1)
        chunks = [docstring.replace("\\\\\n", "\\\n")]  # the source's escaped `\\` continuation
    return "\n".join(chunks).replace("\\\n", " ").splitlines()


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) of every `python examples/X.py ...` / `accelerate launch examples/X.py ...`."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.py"))]:
        for line in code_lines(path):
            for part in re.split(r"&&|;", re.split(r"\s#\s", line)[0]):  # `a && b`: two commands
                match = COMMAND.search(part)
                if match:
                    found.append((path.name, match.group(2), shlex.split(match.group(3))))
    return found


COMMANDS = documented_commands()


def test_the_documents_show_commands_of_every_script():
    assert {script for _, script, _ in COMMANDS} >= set(PARSERS), "a script lost its documented commands"
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w}:{s}:{' '.join(a)[:40]}" for w, s, a in COMMANDS])
def test_a_documented_command_parses(where, script, argv, tmp_path, monkeypatch):
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_info:
            PARSERS[script](argv)
        assert exit_info.value.code == 0
        return
    monkeypatch.chdir(tmp_path)  # a parser that creates its output folder creates it here
    PARSERS[script](argv)
