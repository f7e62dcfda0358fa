"""Fine-tuning and evaluation of hf_mim encoders.

- `layer_decay`: layer-wise lr decay parameter groups (real per-group `lr`);
- `mixup`: MixUp / CutMix (torchvision) and label smoothing as soft targets;
- `trainer`: the transformers Trainer with both, used by `examples/finetune.py` (`run.main`);
- `ema`: timm's model EMA (`--model_ema`) as a Trainer callback over PyTorch's `AveragedModel`;
- `probe`: frozen-encoder evaluation, linear probe and k-NN (`examples/probe.py`).
"""

from .ema import ModelEmaCallback
from .layer_decay import layer_decay_parameter_groups, layer_id, lr_scale, no_weight_decay
from .mixup import SoftTargets
from .trainer import FinetuningTrainer

__all__ = ["FinetuningTrainer", "ModelEmaCallback", "SoftTargets", "layer_decay_parameter_groups", "layer_id",
           "lr_scale", "no_weight_decay"]
