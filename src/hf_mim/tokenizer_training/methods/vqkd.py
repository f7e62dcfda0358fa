"""BEiT v2's VQ-KD tokenizer (Peng et al., 2022): a codebook distilled from a frozen teacher's patch features.

    python examples/train_tokenizer.py --method vqkd --teacher outputs/pretrain-mae
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

from ...cli import option
from ...models import VqkdConfig, VqkdTokenizer
from ...models.vit_core import to_2tuple
from ...teachers import TeacherLoadError, load_teacher, load_teacher_for
from ...training.method import CropOptions
from .base import QuantizerMethod, register_tokenizer_method

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VqkdOptions(CropOptions):
    _argument_group_name = "VQ-KD (--method vqkd)"
    teacher: str | None = option(help="the frozen teacher: ANY transformers vision model id or directory (CLIP, ViT, "
                                      "DINO, DINOv2, hf_mim MAE/BEiT). Never saved with the tokenizer. Default: the "
                                      "config's teacher_name_or_path (vqkd-base: openai/clip-vit-base-patch16; the "
                                      "digits demo has none: train one with `python examples/pretrain.py`, then pass "
                                      "--teacher outputs/pretrain-mae)")
    teacher_type: Literal["auto", "clip"] | None = option(
        help="'clip': a CLIP checkpoint's projected patch tokens; 'auto' (default with --teacher): CLIP detected, any "
             "other model's last_hidden_state patch tokens")
    teacher_layer: int | None = option(help="distil the raw patch tokens of hidden_states[k] instead")
    teacher_input_size: int | None = option(help="resize the teacher's view to this size so that its patch grid "
                                                 "matches the tokenizer's (e.g. 196 for a patch-14 teacher and 14x14 "
                                                 "tokens)")


@register_tokenizer_method
class VqkdTokenizerMethod(QuantizerMethod):
    name = "vqkd"
    title = "VQ-KD tokenizer"
    options_class = VqkdOptions
    summary = "VQ-KD (BEiT v2, Peng et al., 2022): a codebook distilled from a frozen teacher's patch features"
    config_class = VqkdConfig
    model_class = VqkdTokenizer
    term_names = ("distillation_loss", "commitment_loss")
    # BEiT v2's tokenizer recipe: 100 epochs, batch 512, lr 2e-4 (= blr 1e-4 x 512 / 256), AdamW (0.9, 0.99),
    # weight decay 1e-4 (not on the codebook, cls or positions). The warm-up (5% of the run) is ours.
    defaults = {"base_learning_rate": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.99, "weight_decay": 1e-4,
                "num_train_epochs": 100.0, "warmup_steps": 0.05, "max_grad_norm": None}
    demo_defaults = {"base_learning_rate": 4e-3, "num_train_epochs": 10.0, "crop_min_scale": 0.5}
    def __init__(self, args):
        super().__init__(args)
        self.teacher = None

    def teacher_knobs(self) -> dict:
        args, knobs = self.options, {}
        if args.teacher:
            knobs.update(teacher_name_or_path=args.teacher, teacher_type=args.teacher_type or "auto")
        elif args.teacher_type:
            knobs["teacher_type"] = args.teacher_type
        for key in ("teacher_layer", "teacher_input_size"):
            if getattr(args, key) is not None:
                knobs[key] = getattr(args, key)
        return knobs

    def config_knobs(self):
        knobs = {**super().config_knobs(), **self.teacher_knobs()}
        if self.teacher is not None and not self.args.model_name_or_path:  # a new decoder predicts what it gives
            knobs["teacher_dim"] = self.teacher.feature_dim  # (a trained one keeps its size: checked in build_model)
        return knobs

    def build_model(self, default_preset):
        args = self.options
        if args.teacher:  # first, so that a bad teacher fails before anything else, and to size the decoder
            knobs = self.teacher_knobs()
            self.teacher = self.load(lambda: load_teacher(
                args.teacher, teacher_type=knobs["teacher_type"], layer=knobs.get("teacher_layer"),
                input_size=knobs.get("teacher_input_size"), **self.auxiliary_hub_kwargs()))
        model = super().build_model(default_preset)
        if self.teacher is None:
            self.teacher = self.load(lambda: load_teacher_for(model.config, **self.auxiliary_hub_kwargs()))
        else:
            grid = model.token_grid(model.config.image_size)
            self.teacher.check_compatible(image_size=model.config.image_size, grid_size=grid,
                                          feature_dim=model.config.teacher_dim)
        logger.info("Teacher: %s (%d-dim patch features; inputs normalised with %s)", self.teacher.name_or_path,
                    self.teacher.feature_dim, self.teacher.normalization_source)
        return model

    @staticmethod
    def load(loader):
        try:
            return loader()
        except ValueError as error:
            if "names no teacher" in str(error):
                raise ValueError(f"{error} On the command line: --teacher MODEL_ID_OR_DIR (the digits demo: "
                                 "`python examples/pretrain.py` writes an MAE to outputs/pretrain-mae).") from None
            raise
        except TeacherLoadError as error:
            raise TeacherLoadError(f"--teacher: {error}") from error

    @property
    def num_channels(self) -> int:
        return self.config.num_channels

    @property
    def stride(self) -> int:
        return to_2tuple(self.config.patch_size)[0]

    def auxiliary_networks(self):
        return [self.teacher]

    def loss_terms(self, model, pixel_values):
        teacher_features = self.teacher(pixel_values)  # [B, N, T], no gradient, the teacher's own normalisation
        output = model(pixel_values=pixel_values, teacher_features=teacher_features)
        return output.loss, {"distillation_loss": output.distillation_loss,
                             "commitment_loss": output.commitment_loss}, output.indices

    def eval_outputs(self, model, pixel_values):
        output = model(pixel_values=pixel_values, teacher_features=self.teacher(pixel_values))  # teacher: [B, N, T]
        return {"distillation_loss": output.per_sample_distillation_loss}, output.indices  # [B], [B, h, w]

    def recipe(self):
        return {**super().recipe(), "teacher": self.teacher.name_or_path, "teacher_dim": self.teacher.feature_dim,
                "teacher_layer": self.config.teacher_layer, "teacher_input_size": self.config.teacher_input_size,
                "teacher_normalization": self.teacher.normalization_source}


__all__ = ["VqkdOptions", "VqkdTokenizerMethod"]
