"""Recipe details that must match the reference code (issue 11, "exact recipes"): optimizer
groups, inits, mask counts, drop-path rates. Each test names the reference behaviour it checks;
where timm is installed (the reference's own library), against timm itself."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from hf_mim import MaeConfig, MaeForPreTraining
from hf_mim.pretraining import get_method
from hf_mim.training.optimization import build_optimizer

TINY_MAE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                decoder_intermediate_size=64)


def decayed_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> set[str]:
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {name_of[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}


# ---------------------------------------------------------------------------------------------
# MAE pre-training: main_pretrain.py builds its AdamW from timm's param_groups_weight_decay(model,
# wd) without a skip list: only 1-D parameters and biases are exempt, so cls_token and mask_token
# ([1, 1, D]) are decayed.
# ---------------------------------------------------------------------------------------------


def test_mae_pretraining_decays_cls_and_mask_tokens():
    model = MaeForPreTraining(MaeConfig(**TINY_MAE))
    optimizer = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), get_method("mae").no_weight_decay_names)
    decayed = decayed_names(optimizer, model)
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.patch_embed.proj.weight"} <= decayed
    assert not any(name.endswith(".bias") or "norm" in name for name in decayed)


def test_mae_pretraining_groups_are_timms():
    optim = pytest.importorskip("timm.optim")
    model = MaeForPreTraining(MaeConfig(**TINY_MAE))
    ours = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), get_method("mae").no_weight_decay_names)
    reference = optim.param_groups_weight_decay(model, 0.05)  # what main_pretrain.py calls
    name_of = {id(p): name for name, p in model.named_parameters()}

    def by_decay(groups) -> dict[float, set[str]]:
        return {group["weight_decay"]: {name_of[id(p)] for p in group["params"]} for group in groups}

    assert by_decay(ours.param_groups) == by_decay(reference)


# ---------------------------------------------------------------------------------------------
# MAE fine-tuning: models_vit is a timm VisionTransformer whose pos_embed is a Parameter, loaded
# from the pre-training checkpoint's sin-cos table and trained (lr of layer 0, no weight decay).
# ---------------------------------------------------------------------------------------------


def test_mae_fine_tuning_trains_the_position_table_from_the_sincos_start(tmp_path):
    from transformers import AutoModel

    from hf_mim import MaeForImageClassification, MaeModel
    from hf_mim.finetuning import layer_decay_parameter_groups
    from hf_mim.models.vit_core import sincos_2d_table

    torch.manual_seed(0)
    MaeForPreTraining(MaeConfig(**TINY_MAE)).save_pretrained(tmp_path / "pretrained")
    model = MaeForImageClassification.from_pretrained(tmp_path / "pretrained", num_labels=3)
    table = model.encoder.pos_embed
    assert isinstance(table, torch.nn.Parameter) and table.requires_grad
    torch.testing.assert_close(table[0], sincos_2d_table((4, 4), 32), rtol=0, atol=0)
    group = next(g for g in layer_decay_parameter_groups(model, 1.0, 0.05, 0.5) if any(p is table for p in g["params"]))
    assert group["layer_id"] == 0 and group["weight_decay"] == 0.0  # the reference's no_weight_decay: pos_embed

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # the near-zero head leaves the encoder's first gradients tiny: two steps
        optimizer.zero_grad()
        model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
    trained = table.detach().clone()
    assert not torch.equal(trained[0], sincos_2d_table((4, 4), 32))

    model.save_pretrained(tmp_path / "finetuned")
    for loaded in (MaeForImageClassification.from_pretrained(tmp_path / "finetuned"),
                   AutoModel.from_pretrained(tmp_path / "finetuned")):  # the encoder alone keeps it too
        encoder = loaded.encoder if isinstance(loaded, MaeForImageClassification) else loaded
        assert isinstance(encoder, MaeModel)
        torch.testing.assert_close(encoder.pos_embed, trained, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Fine-tuning's RandAugment: BEiT and MAE build it with timm's create_transform(auto_augment=
# "rand-m9-mstd0.5-inc1", interpolation="bicubic"); with timm installed hf_mim runs that same op.
# ---------------------------------------------------------------------------------------------

REFERENCE_AA = "rand-m9-mstd0.5-inc1"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def find_rand_augment(transforms, kind: type):
    return next(step for step in transforms.transforms if isinstance(step, kind))


def op_settings(augment) -> list[tuple]:
    return [(op.name, op.prob, op.magnitude, op.magnitude_std, op.magnitude_max, op.hparams, op.kwargs)
            for op in augment.ops]


def test_rand_augment_is_timms_own_when_timm_is_installed():
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    from PIL import Image
    from timm.data import create_transform

    from hf_mim.finetuning.transforms import train_transform

    ours = find_rand_augment(train_transform(32, MEAN, STD, auto_augment=REFERENCE_AA), auto_augment.RandAugment)
    reference = find_rand_augment(create_transform(32, is_training=True, auto_augment=REFERENCE_AA,
                                                   interpolation="bicubic", mean=MEAN, std=STD),
                                  auto_augment.RandAugment)
    assert ours.num_layers == reference.num_layers == 2 and ours.choice_weights is reference.choice_weights is None
    assert op_settings(ours) == op_settings(reference)
    assert {op.name for op in ours.ops} >= {"PosterizeIncreasing", "SolarizeIncreasing"}  # "inc1"
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(0)).numpy())
    outputs = []
    for augment in (ours, reference):  # the same random draws give the same image
        random.seed(3)
        np.random.seed(3)
        outputs.append(np.asarray(augment(image)))
    assert (outputs[0] == outputs[1]).all() and not (outputs[0] == np.asarray(image)).all()


def test_rand_augment_without_timm_is_torchvisions_with_a_warning(monkeypatch, caplog):
    from torchvision.transforms import v2

    from hf_mim.finetuning.transforms import rand_augment

    monkeypatch.setitem(sys.modules, "timm.data.auto_augment", None)  # as if timm were not installed
    with caplog.at_level("WARNING"):
        augment = rand_augment(REFERENCE_AA, MEAN, 32)
    assert isinstance(augment, v2.RandAugment) and augment.magnitude == 9 and augment.num_ops == 2
    assert "timm is not installed" in caplog.text and "inc / mstd" in caplog.text
