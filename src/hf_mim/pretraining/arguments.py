"""Command line of `examples/pretrain.py`: the engine's (`hf_mim.training.arguments`) with the MIM
methods' registry, `--method mae` by default, and this script's texts."""

from __future__ import annotations

import dataclasses

from ..cli import MimArgumentParser, option
from ..training.arguments import Options, Script, parse_options
from ..training.arguments import build_parser as build_script_parser
from .methods import METHODS

DESCRIPTION = """\
Masked-image-modeling pre-training with Accelerate.

With no argument it pre-trains a tiny MAE on scikit-learn's handwritten digits (embedded, offline)
in a few minutes on a CPU and writes the model, its image processor, a model card, a log and a
reconstruction figure to outputs/pretrain-mae.
"""

EPILOG = """\
launch modes:
  python examples/pretrain.py                                   # one process (CPU or one GPU)
  accelerate launch examples/pretrain.py ...                    # your `accelerate config`
  accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/pretrain.py ...
  accelerate launch --multi_gpu --num_processes 8 examples/pretrain.py ...
  torchrun --nproc_per_node 8 examples/pretrain.py ...
  accelerate launch --config_file examples/accelerate_configs/multi_node.yaml --machine_rank R \\
      --main_process_ip HOST examples/pretrain.py ...

examples:
  # MAE ViT-B/16 on ImageNet-1k (the published recipe: 4096 images per step, blr 1.5e-4)
  accelerate launch examples/pretrain.py --dataset_name ILSVRC/imagenet-1k --config_name mae-base \\
      --norm_pix_loss --per_device_train_batch_size 512 --gradient_accumulation_steps 1 \\
      --num_train_epochs 800 --warmup_steps 0.05 --bf16 --output_dir outputs/mae-base
  # parquet files, resumed automatically from the newest checkpoint in --output_dir
  python examples/pretrain.py --train_file 'data/train-*.parquet' --validation_file data/val.parquet
"""


@dataclasses.dataclass
class MethodArguments:
    _argument_group_name = "method"
    method: str = option("mae", help="the MIM method; `--method NAME --help` lists its own options")


PRETRAIN = Script(
    prog="pretrain.py", method_arguments=MethodArguments, methods=METHODS, epilog=EPILOG,
    describe=lambda method_cls: f"{DESCRIPTION}\n--method {method_cls.name}: {method_cls.summary}",
    output_dir="outputs/pretrain-{method}",
)


def build_parser(method_name: str = "mae") -> MimArgumentParser:
    return build_script_parser(PRETRAIN, method_name)


def parse_args(argv: list[str] | None = None) -> Options:
    return parse_options(PRETRAIN, argv)


__all__ = ["PRETRAIN", "MethodArguments", "build_parser", "parse_args"]
