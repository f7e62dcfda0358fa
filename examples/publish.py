"""Publish a saved hf_mim checkpoint to the Hugging Face Hub, with a model card.

  python examples/publish.py --model_dir outputs/mae-tiny --repo_id my-name/mae-tiny

The directory is what `model.save_pretrained(...)` (and optionally the image processor's) wrote.
A README.md model card is written into it when missing (or rewritten when any card option is given);
the repository is created if needed and the folder uploaded in one commit. Authentication: HF_TOKEN,
`hf auth login`, or --hub_token. HF_ENDPOINT selects another Hub endpoint.

Card options record what the run actually used and measured; nothing is filled in for you:
  --recipe run/hyperparameters.json     JSON {name: value} of the hyper-parameters used
  --results run/eval_results.json       JSON {metric: number} measured on --eval_split of --dataset
  --result_keys eval_accuracy           keep only these keys of --results (drop runtime, epoch ...)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hf_mim.cards import METHODS, TASKS
from hf_mim.cli import MimArgumentParser
from hf_mim.hub import PublishError, publish

CARD_OPTIONS = ("method", "task", "dataset", "dataset_config", "eval_split", "base_model", "tokenizer",
                "tokenizer_revision", "license", "recipe", "results")


def build_parser() -> argparse.ArgumentParser:
    """The same spelling rules as the other scripts (`--a_b` or `--a-b`, close matches for a typo)."""
    parser = MimArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hub = parser.add_argument_group("checkpoint and Hub")
    hub.add_argument("--model_dir", required=True, help="folder written by save_pretrained")
    hub.add_argument("--repo_id", "--hub_model_id", dest="repo_id", help="Hub repository, NAMESPACE/NAME")
    hub.add_argument("--hub_token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    hub.add_argument("--hub_private_repo", action="store_true",
                     help="create the repository as private (no effect on an existing one)")
    hub.add_argument("--hub_revision", help="branch to push to (created from main if missing; default main)")
    hub.add_argument("--commit_message", default="Upload hf_mim model")
    card = parser.add_argument_group("model card (README.md)")
    card.add_argument("--method", choices=sorted(METHODS), help="default: from the config's model_type")
    card.add_argument("--task", choices=TASKS, help="default: from the saved architecture")
    card.add_argument("--dataset", help="training / evaluation data set (Hub id or local name)")
    card.add_argument("--dataset_config", help="data set configuration name")
    card.add_argument("--eval_split", help="split the results were measured on (default validation)")
    card.add_argument("--base_model", help="checkpoint this model was fine-tuned from")
    card.add_argument("--tokenizer", help="tokenizer whose codes were the pre-training targets")
    card.add_argument("--tokenizer_revision", help="commit of that tokenizer")
    card.add_argument("--license", help="licence id for the card (default apache-2.0)")
    card.add_argument("--recipe", type=Path, help="JSON file {hyper-parameter: value} of the run")
    card.add_argument("--results", type=Path, help="JSON file {metric: number} measured by the run")
    card.add_argument("--result_keys", nargs="+", help="keep only these keys of --results")
    card.add_argument("--refresh_card", action="store_true", help="rewrite an existing README.md")
    return parser


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--{what} {path}: cannot read a JSON object ({error}).") from error
    if not isinstance(data, dict):
        raise ValueError(f"--{what} {path} must hold a JSON object {{name: value}}.")
    return data


def card_kwargs(args: argparse.Namespace) -> dict | None:
    """make_model_card arguments from the card options; None when none was given (keep README.md)."""
    given = {name: getattr(args, name) for name in CARD_OPTIONS if getattr(args, name) is not None}
    if not given and not args.refresh_card:
        return None
    if "recipe" in given:
        given["recipe"] = read_json(given["recipe"], "recipe")
    if "results" in given:
        results = read_json(given["results"], "results")
        if args.result_keys:
            unknown = sorted(set(args.result_keys) - set(results))
            if unknown:
                raise ValueError(f"--result_keys {unknown} are not in {args.results} (keys: {sorted(results)}).")
            results = {key: results[key] for key in args.result_keys}
        given["results"] = results
    return given


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        url = publish(args.model_dir, args.repo_id, token=args.hub_token, private=args.hub_private_repo,
                      revision=args.hub_revision, commit_message=args.commit_message, card_kwargs=card_kwargs(args))
    except (ValueError, FileNotFoundError, PublishError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
