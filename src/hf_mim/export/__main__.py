"""``python -m hf_mim.export {timm,transformers} SRC OUT [--encoder_only]``

Turns an hf_mim checkpoint (MAE, BEiT / BEiT v2, ViT-MPP; pre-training or classification) into a
folder that another library loads without hf_mim:

  timm          model.safetensors + timm's config.json: timm.create_model("local-dir:OUT", pretrained=True)
  transformers  transformers' own ViTMAE* / Beit* / ViT* classes (save_pretrained): no remote code

Parts the target has no place for are named (timm: decoders and pre-training heads are left out,
with a warning; transformers: an error says what to export instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .common import ExportError, load_hf_mim_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_mim.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("timm", "transformers"))
    parser.add_argument("src", help="hf_mim checkpoint folder (save_pretrained) or Hub id")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--encoder_only", action="store_true",
                        help="transformers: export the encoder alone (ViTModel / BeitModel): every token, computed as "
                             "hf_mim computes it (an MAE encoder is never masked)")
    return parser


def read_processor(src: str) -> dict | None:
    path = os.path.join(src, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = load_hf_mim_model(args.src)
        if args.target == "timm":
            from .to_timm import export_to_timm

            timm_config = export_to_timm(model, args.out, read_processor(args.src))
            print(f"Saved timm {timm_config['architecture']} ({type(model).__name__}) to {args.out}: "
                  f'timm.create_model("local-dir:{args.out}", pretrained=True)')
        else:
            from .to_transformers import export_to_transformers

            exported = export_to_transformers(model, encoder_only=args.encoder_only)
            exported.save_pretrained(args.out)
            print(f"Saved transformers {type(exported).__name__} to {args.out}")
    except (ExportError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
