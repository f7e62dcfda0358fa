"""One real `transformers.Trainer` step on CPU for the MAE pre-training and classification heads."""

from __future__ import annotations

import torch
from datasets import Dataset
from mae_testing import tiny_mae_config
from transformers import Trainer, TrainingArguments

from hf_mim import MaeForImageClassification, MaeForPreTraining


def tiny_dataset(with_labels: bool) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    columns = {"pixel_values": torch.randn(4, 3, 32, 32, generator=generator).tolist()}
    if with_labels:
        columns["labels"] = [0, 1, 2, 1]
    return Dataset.from_dict(columns).with_format("torch")


def train_one_step(model, dataset, tmp_path) -> tuple[dict, float]:
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, per_device_train_batch_size=4,
        learning_rate=1e-2, save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0,
    )
    result = Trainer(model=model, args=args, train_dataset=dataset).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    return changed, result.training_loss


def test_trainer_step_pretraining(tmp_path):
    torch.manual_seed(0)
    model = MaeForPreTraining(tiny_mae_config(norm_pix_loss=True))
    changed, loss = train_one_step(model, tiny_dataset(with_labels=False), tmp_path)
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every parameter got a gradient and moved, the decoder's mask token included
    assert "decoder.mask_token" in changed and "encoder.cls_token" in changed


def test_trainer_step_classification(tmp_path):
    torch.manual_seed(0)
    model = MaeForImageClassification(tiny_mae_config(num_labels=3))
    changed, loss = train_one_step(model, tiny_dataset(with_labels=True), tmp_path)
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    assert changed == {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "fc_norm.weight", "encoder.cls_token"} <= changed
