"""``python -m hf_mim.convert METHOD SRC OUT [--config KEY=VALUE ...]``

Turns a reference checkpoint (or a transformers directory) into a ``save_pretrained`` directory
that loads with the Auto classes. Each converter lives in its own module of this package and
exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``convert(args) -> PreTrainedModel``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# method name -> module of this package implementing it
CONVERTERS = {
    "mae": "mae",
    "dalle": "dalle",
    "beit": "beit",
    "beitv2": "beitv2",
    "vqkd": "vqkd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_mim.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, module_name in CONVERTERS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        sub = methods.add_parser(name, help=module.HELP, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("src", help="reference checkpoint file or transformers model directory")
        sub.add_argument("out", help="output directory (save_pretrained layout)")
        sub.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                         help="config fields the checkpoint cannot tell (defaults: the published models' values)")
        module.add_arguments(sub)
        sub.set_defaults(convert=module.convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = args.convert(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Saved {type(model).__name__} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
