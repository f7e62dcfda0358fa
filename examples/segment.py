"""Semantic segmentation with UperNet on an hf_mim backbone (the BEiT / MAE segmentation recipe).

    python examples/segment.py                                    # digit scenes demo (ink task), tiny model:
                                                                  # ~1.5 min on 2 CPU cores, mIoU 0.11 -> 0.68
    python examples/segment.py --scene_labels digits              # one class per digit (not learnt at demo scale)
    python examples/segment.py --model_name_or_path outputs/pretrain-mae   # the pre-training demo's encoder
    python examples/segment.py --help                             # every option (all TrainingArguments flags too)

    # ADE20K-style data on the Hub (image + mask columns; value 255 = unlabelled), BEiT-base recipe
    accelerate launch examples/segment.py --model_name_or_path BEIT_CHECKPOINT --dataset_name scene_parse_150 \\
        --num_labels 150 --image_size 512 --learning_rate 7e-4 --layer_decay 0.65 --per_device_train_batch_size 2 \\
        --max_steps 160000 --warmup_steps 1500 --bf16 --output_dir outputs/beit-base-ade20k

    # your own data: folders with images/ and masks/ (same file names), or parquet files
    python examples/segment.py --model_name_or_path CKPT --train_dir data/train --validation_dir data/val --num_labels 5

The code lives in `hf_mim.segmentation` (run.py, data.py).
"""

from hf_mim.data import DataSourceUnreachableError
from hf_mim.segmentation.run import main

if __name__ == "__main__":
    try:
        main()
    except DataSourceUnreachableError as error:  # one sentence: the traceback adds nothing to it
        raise SystemExit(f"error: {error}") from None
