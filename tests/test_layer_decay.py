"""Layer-wise lr decay checked on the optimizer the transformers Trainer really builds and steps.

A parameter at layer `i` of an L-block encoder must train at ``base * decay^(L + 1 - i) * schedule(k)``
at optimizer step k (patch embedding and tokens: layer 0, block n: layer n + 1, what follows the
blocks: L + 1) under transformers' own scheduler. With plain SGD the update a step applies is
``lr * (grad + weight_decay * param)``, so the lr and the weight decay each parameter actually got
are read back from the parameters themselves, not from the optimizer's bookkeeping.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_mim import (
    BEiTConfig, BEiTForImageClassification, MaeConfig, MaeForImageClassification, VitMppConfig,
    VitMppForImageClassification,
)
from hf_mim.finetuning import FinetuningTrainer, layer_decay_parameter_groups

NUM_LAYERS, NUM_LABELS, BATCH = 2, 3, 4


pytestmark = pytest.mark.usefixtures("single_torch_thread")
TINY = dict(hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=NUM_LABELS, drop_path_rate=0.0)

# Per family: the classifier, and every parameter's layer written out by name prefix (L = 2).
FAMILIES = {
    "mae": (lambda: MaeForImageClassification(MaeConfig(**TINY)), {
        "encoder.patch_embed.": 0, "encoder.cls_token": 0, "encoder.pos_embed": 0, "encoder.blocks.0.": 1,
        "encoder.blocks.1.": 2,
        "fc_norm.": 3, "head.": 3,
    }),
    # BEiT pre-training layout: one relative position table shared by every block, trained at the
    # top rate as in the official fine-tuning code.
    "beit": (lambda: BEiTForImageClassification(BEiTConfig(**TINY)), {
        "beit.patch_embed.": 0, "beit.cls_token": 0, "beit.blocks.0.": 1, "beit.blocks.1.": 2,
        "beit.rel_pos_bias.": 3, "fc_norm.": 3, "head.": 3,
    }),
    "beit_per_block": (lambda: BEiTForImageClassification(BEiTConfig(
        **TINY, use_shared_relative_position_bias=False, use_relative_position_bias=True)), {
        "beit.patch_embed.": 0, "beit.cls_token": 0, "beit.blocks.0.": 1, "beit.blocks.1.": 2,
        "fc_norm.": 3, "head.": 3,
    }),
    "vit_mpp": (lambda: VitMppForImageClassification(VitMppConfig(**TINY)), {
        "vit.patch_embed.": 0, "vit.cls_token": 0, "vit.pos_embed": 0, "vit.blocks.0.": 1, "vit.blocks.1.": 2,
        "fc_norm.": 3, "head.": 3,
    }),
}
# The only weight-decayed parameters: the matrices of linear layers and the patch projection, and
# BEiT's relative position tables (the reference fine-tuning code exempts only `cls_token` and
# `pos_embed`; the tables only with --disable_weight_decay_on_rel_pos_bias, off by default).
DECAYED_SUFFIXES = (
    "qkv.weight", "proj.weight", "fc1.weight", "fc2.weight", "head.weight", "relative_position_bias_table",
)


def expected_layer(name: str, prefixes: dict[str, int]) -> int:
    matches = [layer for prefix, layer in prefixes.items() if name.startswith(prefix)]
    assert len(matches) == 1, f"{name} matches {len(matches)} layer prefixes of the test"
    return matches[0]


def expected_weight_decay(name: str, weight_decay: float) -> float:
    return weight_decay if name.endswith(DECAYED_SUFFIXES) else 0.0


def schedule(name: str, step: int, warmup: int, total: int) -> float:
    """transformers' schedules, written from their definitions."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return 1.0 - progress
    if name == "constant_with_warmup":
        return 1.0
    raise AssertionError(name)


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, count: int = 16):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(count, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, NUM_LABELS, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


class RecordSteps(TrainerCallback):
    """Per optimizer step: every group's lr and weight decay, and each parameter's value and
    gradient just before `optimizer.step()` (after clipping) and its value just after."""

    def __init__(self, model):
        self.named = list(model.named_parameters())
        self.steps: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append({
            "step": state.global_step,
            "groups": [(group["lr"], group["weight_decay"], {id(p) for p in group["params"]})
                       for group in optimizer.param_groups],
            "before": {name: p.detach().clone() for name, p in self.named},
            "grad": {name: p.grad.detach().clone() for name, p in self.named if p.grad is not None},
        })

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps[-1]["after"] = {name: p.detach().clone() for name, p in self.named}


def train(model, tmp_path, *, optim: str, scheduler: str, base_lr: float, decay: float, weight_decay: float,
          max_steps: int, warmup: int) -> tuple[RecordSteps, FinetuningTrainer]:
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=max_steps, warmup_steps=warmup,
        per_device_train_batch_size=BATCH, learning_rate=base_lr, weight_decay=weight_decay, optim=optim,
        lr_scheduler_type=scheduler, max_grad_norm=0.0, save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, remove_unused_columns=False, seed=0,
    )
    recorder = RecordSteps(model)
    trainer = FinetuningTrainer(model=model, args=args, train_dataset=RandomImages(), layer_decay=decay,
                                callbacks=[recorder])
    trainer.train()
    return recorder, trainer


@pytest.mark.parametrize("family, scheduler, optim", [
    ("mae", "cosine", "sgd"),
    ("beit", "linear", "sgd"),
    ("beit_per_block", "cosine", "sgd"),
    ("vit_mpp", "constant_with_warmup", "adamw_torch"),
])
def test_effective_lr_is_layer_decay_times_schedule(family, scheduler, optim, tmp_path):
    torch.manual_seed(0)
    build, prefixes = FAMILIES[family]
    model = build()
    base_lr, decay, weight_decay, max_steps, warmup = 0.5, 0.5, 0.05, 6, 2
    recorder, trainer = train(model, tmp_path, optim=optim, scheduler=scheduler, base_lr=base_lr, decay=decay,
                              weight_decay=weight_decay, max_steps=max_steps, warmup=warmup)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    assert type(optimizer) is {"sgd": torch.optim.SGD, "adamw_torch": torch.optim.AdamW}[optim]
    assert [record["step"] for record in recorder.steps] == list(range(max_steps))
    layer = {name: expected_layer(name, prefixes) for name, _ in model.named_parameters()}
    assert set(layer.values()) == set(range(NUM_LAYERS + 2))  # every layer is present in the test model

    for record in recorder.steps:
        factor = schedule(scheduler, record["step"], warmup, max_steps)
        group_of = {pid: (lr, wd) for lr, wd, ids in record["groups"] for pid in ids}
        for name, parameter in model.named_parameters():
            lr = base_lr * decay ** (NUM_LAYERS + 1 - layer[name]) * factor
            wd = expected_weight_decay(name, weight_decay)
            # The optimizer's own groups: the decay is in the real lr every scheduler scales.
            assert group_of[id(parameter)] == (pytest.approx(lr, rel=1e-9, abs=1e-12), wd), name
            if optim == "sgd":  # and the update the step applied: p <- p - lr * (grad + wd * p)
                before, after = record["before"][name], record["after"][name]
                update = lr * (record["grad"][name] + wd * before)
                torch.testing.assert_close(before - after, update, rtol=1e-3, atol=2e-6, msg=name)

    # The Trainer logs the first group's lr: the top layer's, i.e. the plain schedule.
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    expected_logged = [base_lr * schedule(scheduler, step, warmup, max_steps) for step in range(max_steps)]
    assert logged == pytest.approx(expected_logged, rel=1e-6, abs=1e-12)


def test_updates_actually_happen_at_every_layer(tmp_path):
    """A decay that only sat in bookkeeping would still leave every layer's parameters moving; this
    check pins the ratio between layers: the embedding moves decay^(L+1) times as fast as the head.
    Read at the second step: at the first, the near-zero head (std 2e-5) leaves the encoder's
    gradients at rounding level."""
    torch.manual_seed(0)
    model = FAMILIES["mae"][0]()
    recorder, _ = train(model, tmp_path, optim="sgd", scheduler="constant_with_warmup", base_lr=0.5, decay=0.25,
                        weight_decay=0.0, max_steps=2, warmup=0)
    record = recorder.steps[1]
    implied = {}
    for name in ("encoder.patch_embed.proj.weight", "encoder.blocks.0.mlp.fc1.weight",
                 "encoder.blocks.1.mlp.fc1.weight", "head.weight"):
        grad, delta = record["grad"][name], record["before"][name] - record["after"][name]
        implied[name] = float((delta * grad).sum() / (grad * grad).sum())  # least-squares lr of this step
    assert implied["head.weight"] == pytest.approx(0.5, rel=1e-3)
    assert implied["encoder.blocks.1.mlp.fc1.weight"] == pytest.approx(0.5 * 0.25, rel=1e-3)
    assert implied["encoder.blocks.0.mlp.fc1.weight"] == pytest.approx(0.5 * 0.25**2, rel=1e-3)
    assert implied["encoder.patch_embed.proj.weight"] == pytest.approx(0.5 * 0.25**3, rel=1e-3)


def test_frozen_parameters_are_left_out_and_bad_decay_is_rejected():
    model = FAMILIES["mae"][0]()
    model.encoder.patch_embed.requires_grad_(False)
    groups = layer_decay_parameter_groups(model, 1e-3, 0.05, 0.75)
    grouped = {id(p) for group in groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(group["params"] for group in groups)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--layer_decay must be in"):
            layer_decay_parameter_groups(model, 1e-3, 0.05, bad)
