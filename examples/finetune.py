"""Image-classification fine-tuning of hf_mim encoders with the transformers Trainer.

    python examples/finetune.py                       # tiny ViT on the embedded digits, a few CPU minutes
    python examples/finetune.py --model_name_or_path outputs/pretrain-mae   # fine-tune the pre-training demo:
                                                      # 5 epochs, 1-3 CPU minutes, top-1 ~0.94 (chance 0.1)
    python examples/finetune.py --help                # every option (all TrainingArguments flags too)

    # MAE ViT-B/16 recipe on ImageNet-1k (total batch 1024)
    accelerate launch examples/finetune.py --model_name_or_path MAE_CHECKPOINT --dataset_name ILSVRC/imagenet-1k \\
        --per_device_train_batch_size 128 --gradient_accumulation_steps 1 --blr 5e-4 --layer_decay 0.65 \\
        --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --num_train_epochs 100 --warmup_steps 0.05 \\
        --bf16 --output_dir outputs/mae-base-in1k

The code lives in `hf_mim.finetuning` (run.py) and `hf_mim.data`.
"""

from hf_mim.data import DataSourceUnreachableError
from hf_mim.finetuning.run import main

if __name__ == "__main__":
    try:
        main()
    except DataSourceUnreachableError as error:  # one sentence: the traceback adds nothing to it
        raise SystemExit(f"error: {error}") from None
