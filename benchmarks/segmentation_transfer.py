"""Does pre-training help segmentation? A pre-trained and a randomly initialised backbone, fine-tuned
the same way on the digit scenes (issue 10's open claim).

1. MAE pre-training (`hf_mim.pretraining`, the real script) on unlabelled digit scenes, made with
   another seed than the segmentation run's scenes;
2. for each seed, two runs of `examples/segment.py`'s code with the same recipe, data and head:
   from the pre-trained encoder and from the same architecture at random init;
3. mean IoU and each class's IoU of both, their difference per seed and its mean;
4. what the two encoders' features hold, apart from any training on them: a ridge regression from
   each block's patch tokens to the patch's ink pixels (fit on 300 scenes, IoU on 100 others).

    python benchmarks/segmentation_transfer.py                        # CPU: tiny backbone, 3 seeds, ~2 min
    python benchmarks/segmentation_transfer.py --max_train_samples 8 --seg_epochs 136   # 8 labelled scenes
    # larger, for a GPU (not run yet): 1.3 M pre-training images, 1,700 labelled scenes, 2 seeds
    python benchmarks/segmentation_transfer.py --backbone mae-demo --unlabelled_scenes 20000 \\
        --pretrain_steps 5000 --pretrain_batch_size 256 --num_scenes 2000 --seg_epochs 20 --seg_batch_size 32 \\
        --decoder_channels 64 --seeds 0,1

The pre-training base learning rate defaults to the digits demo's (6e-3), not MAE's 1.5e-4: with
the linear scaling rule (lr = blr x batch / 256) MAE's gives 1.9e-5 at batch 32, and a few hundred
steps at that rate leave the encoder next to its initialisation (a comparison that cannot show anything).
Figures: RESULTS.md, "Segmentation transfer".
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from hf_mim import MaeBackbone, MaeConfig
from hf_mim.finetuning.transforms import default_mean_std
from hf_mim.models.configuration_mae import PRESETS
from hf_mim.models.vit_core import patchify
from hf_mim.pretraining import main as pretrain
from hf_mim.segmentation.data import SegmentationExamples, make_digit_scenes
from hf_mim.segmentation.run import main as segment

# The backbone of tests/test_segment.py: 4 blocks of width 32, patch 4 on 32 px.
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=32)
UNLABELLED_SEED = 101  # the segmentation runs make their scenes with their own seed (0, 1, 2, ...)
READOUT_SEED = 102


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="tiny", choices=["tiny", "mae-demo"],
                        help="MAE architecture (both at the scenes' 32 px)")
    parser.add_argument("--norm_pix_loss", action="store_true", help="pre-train on per-patch normalised pixels")
    parser.add_argument("--unlabelled_scenes", type=int, default=640, help="scenes for pre-training")
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--pretrain_batch_size", type=int, default=32)
    parser.add_argument("--pretrain_base_lr", type=float, default=6e-3, help="base LR (x batch / 256)")
    parser.add_argument("--num_scenes", type=int, default=160, help="labelled scenes (15%% held out for mIoU)")
    parser.add_argument("--max_train_samples", type=int, help="use only this many labelled training scenes")
    parser.add_argument("--scene_labels", default="ink", choices=["ink", "digits"])
    parser.add_argument("--seg_epochs", type=float, default=8)
    parser.add_argument("--seg_batch_size", type=int, default=8)
    parser.add_argument("--seg_lr", type=float, default=3e-3)
    parser.add_argument("--layer_decay", type=float, default=0.65, help="1e-4: the backbone in effect frozen")
    parser.add_argument("--decoder_channels", type=int, default=16)
    parser.add_argument("--seeds", default="0,1,2", help="segmentation seeds (scenes, head init, order)")
    parser.add_argument("--output_dir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def pretrain_encoder(args, folder: Path) -> tuple[Path, Path]:
    """The architecture's config folder and the MAE checkpoint pre-trained on unlabelled scenes."""
    config_dir, checkpoint = folder / "config", folder / "mae"
    architecture = TINY if args.backbone == "tiny" else PRESETS[args.backbone]
    MaeConfig(**architecture, norm_pix_loss=args.norm_pix_loss).save_pretrained(config_dir)
    scenes = folder / "unlabelled.parquet"
    make_digit_scenes(args.unlabelled_scenes, seed=UNLABELLED_SEED).remove_columns("mask").to_parquet(scenes)
    pretrain(["--train_file", str(scenes), "--config_name", str(config_dir), "--output_dir", str(checkpoint),
              "--max_steps", str(args.pretrain_steps), "--per_device_train_batch_size", str(args.pretrain_batch_size),
              "--base_learning_rate", str(args.pretrain_base_lr), "--max_eval_samples", "64",
              "--checkpointing_steps", str(10 * args.pretrain_steps), "--report_to", "none"])
    return config_dir, checkpoint


def segmentation_scores(args, seed: int, backbone: list[str], output_dir: Path) -> dict[str, float]:
    """Mean IoU and each class's IoU (eval_iou_*) of one segmentation run."""
    argv = ["--num_scenes", str(args.num_scenes), "--scene_labels", args.scene_labels, "--seed", str(seed),
            "--num_train_epochs", str(args.seg_epochs), "--per_device_train_batch_size", str(args.seg_batch_size),
            "--learning_rate", str(args.seg_lr), "--layer_decay", str(args.layer_decay),
            "--decoder_channels", str(args.decoder_channels), "--auxiliary_channels", str(args.decoder_channels // 2),
            "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--output_dir", str(output_dir), *backbone]
    if args.max_train_samples:
        argv += ["--max_train_samples", str(args.max_train_samples)]
    metrics = segment(argv)
    return {key.removeprefix("eval_"): round(value, 4) for key, value in metrics.items()
            if key == "eval_mean_iou" or key.startswith("eval_iou_")}


def patch_ink(size: int, patch_size: int, fit: int = 300, held_out: int = 100):
    """Scenes for the readout: pixels [N, 3, S, S] (the segmentation run's evaluation transform) and
    each patch's ink [N * g * g, p * p] (g = S / p patches a side)."""
    mean, std = default_mean_std(3)
    scenes = make_digit_scenes(fit + held_out, seed=READOUT_SEED, labels="ink")
    examples = SegmentationExamples(scenes, "image", "mask", size, mean, std, train=False)
    pixels = torch.stack([examples[i]["pixel_values"] for i in range(len(examples))])  # [N, 3, S, S]
    labels = torch.stack([examples[i]["labels"] for i in range(len(examples))])  # [N, S, S]
    ink = patchify(labels[:, None].float(), patch_size)  # [N, g * g, p * p]: the tokens' order
    return pixels, ink.reshape(-1, patch_size**2)


@torch.no_grad()
def ink_readout(backbone: MaeBackbone, fit: int = 300, held_out: int = 100) -> list[float]:
    """Per block (0 = patch embedding): IoU of a ridge regression from the patch tokens to the
    patch's ink pixels, fit on `fit` scenes (with its threshold) and scored on `held_out` others."""
    config = backbone.config
    pixels, ink = patch_ink(config.image_size, config.patch_size, fit, held_out)
    tokens = config.image_size // config.patch_size
    split = fit * tokens**2
    ious = []
    for hidden in backbone.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states:
        features = hidden[:, -tokens**2:].reshape(-1, hidden.shape[-1])  # [N * g * g, D], CLS left out
        features = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
        train, test = features[:split], features[split:]
        weights = torch.linalg.solve(train.T @ train + 1e-2 * torch.eye(train.shape[1], dtype=train.dtype),
                                     train.T @ ink[:split].double())  # [D + 1, p * p]
        fitted, truth = train @ weights, ink[:split] > 0.5
        # ink is rare, so 0.5 finds little: the threshold that fits the fitting scenes best
        threshold = max((0.1, 0.2, 0.3, 0.4, 0.5), key=lambda t: thresholded_iou(fitted, truth, t))
        ious.append(round(thresholded_iou(test @ weights, ink[split:] > 0.5, threshold), 4))
    return ious


def thresholded_iou(predicted: torch.Tensor, truth: torch.Tensor, threshold: float) -> float:
    chosen = predicted > threshold
    return float((chosen & truth).sum() / (chosen | truth).sum())


def compare(args, folder: Path) -> dict:
    config_dir, checkpoint = pretrain_encoder(args, folder)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        pretrained = segmentation_scores(args, seed, ["--model_name_or_path", str(checkpoint)], folder / f"pre{seed}")
        scratch = segmentation_scores(args, seed, ["--config_name", str(config_dir)], folder / f"random{seed}")
        runs.append({"seed": seed, "pretrained": pretrained, "random": scratch,
                     "difference": round(pretrained["mean_iou"] - scratch["mean_iou"], 4)})
        print(f"seed {seed}: mean IoU pre-trained {pretrained['mean_iou']:.3f}, random {scratch['mean_iou']:.3f}, "
              f"difference {runs[-1]['difference']:+.3f}", flush=True)
    differences = [run["difference"] for run in runs]
    torch.manual_seed(0)
    readout = {"pretrained": ink_readout(MaeBackbone.from_pretrained(checkpoint)),
               "random": ink_readout(MaeBackbone(MaeConfig.from_pretrained(config_dir)))}
    print(f"ink readout IoU per block, pre-trained: {readout['pretrained']}, random: {readout['random']}")
    return {"settings": vars(args), "runs": runs, "mean_difference": round(statistics.fmean(differences), 4),
            "min_difference": min(differences), "max_difference": max(differences), "ink_readout_iou": readout}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.output_dir:
        results = compare(args, Path(args.output_dir))
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = compare(args, Path(folder))
    print(f"mean IoU, pre-trained - random: mean {results['mean_difference']:+.3f} (from "
          f"{results['min_difference']:+.3f} to {results['max_difference']:+.3f}) over {len(results['runs'])} seeds")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
