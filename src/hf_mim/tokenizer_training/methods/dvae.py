"""DALL-E's discrete VAE (Ramesh et al., 2021), BEiT v1's tokenizer: Gumbel-softmax relaxation, KL to a
uniform prior, temperature annealed with the optimiser step (`after_optimizer_step`).

    python examples/train_tokenizer.py --method dvae
"""

from __future__ import annotations

import warnings

from ...models import DvaeConfig, DvaeTokenizer
from ...models.vit_core import to_2tuple
from .base import TokenizerMethod, register_tokenizer_method

# The fraction of the codes a logging window could have used (min(codes, tokens seen)) below which a
# dVAE run warns; the EMA quantizer warns by itself (its `usage_warning_threshold`).
DVAE_USAGE_WARNING = 0.5
DVAE_WARNING_INTERVAL = 100  # optimiser steps between two collapse warnings


@register_tokenizer_method
class DvaeTokenizerMethod(TokenizerMethod):
    name = "dvae"
    title = "DALL-E dVAE tokenizer"
    summary = ("DALL-E dVAE (Ramesh et al., 2021): Gumbel-softmax relaxation, uniform prior (KL), annealed "
               "temperature")
    config_class = DvaeConfig
    model_class = DvaeTokenizer
    term_names = ("reconstruction_loss", "kl_loss")
    # DALL-E, appendix A.2 as we read it: AdamW (0.9, 0.999), weight decay 1e-4, lr 1e-4 at batch 512 (here
    # as blr 5e-5 x batch / 256), cosine; the temperature and KL schedules are config fields.
    defaults = {"base_learning_rate": 5e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 1e-4,
                "warmup_steps": 0, "max_grad_norm": None}
    demo_defaults = {"base_learning_rate": 4e-3, "num_train_epochs": 10.0, "crop_min_scale": 0.5}
    preset_image_sizes = {"dvae-demo": 32, "dvae-base": 256}  # DALL-E trains at 256 px

    def __init__(self, args):
        super().__init__(args)
        self.preset, self.last_warning_step = None, None

    def build_model(self, default_preset):
        if self.args.patch_size is not None:
            raise ValueError("--patch_size does not apply to the dVAE: its grid is image_size / 2**(num_groups - 1).")
        self.preset = self.args.config_name or default_preset
        model = super().build_model(default_preset)
        model.token_grid(self.image_size)  # a clear error now if the size does not fit the downsampling
        return model

    def config_knobs(self) -> dict:
        return {}  # no image_size or patch_size field: the data's resolution is the method's

    @property
    def image_size(self) -> tuple[int, int]:
        return to_2tuple(self.args.image_size or self.preset_image_sizes.get(self.preset, 112))

    @property
    def num_channels(self) -> int:
        return self.config.input_channels

    @property
    def stride(self) -> int:
        return self.config.downsample_factor

    def loss_terms(self, model, pixel_values):
        output = model(pixel_values=pixel_values, step=self.step)
        indices = output.logits.detach().argmax(dim=1)  # [B, h, w]: the codes the relaxation concentrates on
        return output.loss, {"reconstruction_loss": output.reconstruction_loss, "kl_loss": output.kl_loss}, indices

    def codebook_health(self, window_counts, tokenizer):
        step = self.trained_step  # the window's last batch was trained at these values
        temperature, kl_weight = tokenizer.schedule_values(step)
        tokens, num_codes = float(window_counts.sum()), len(window_counts)
        used = int((window_counts > 0).sum())
        possible = min(num_codes, int(tokens))
        due = self.last_warning_step is None or step - self.last_warning_step >= DVAE_WARNING_INTERVAL
        if tokens and used < DVAE_USAGE_WARNING * possible and due and self.accelerator.is_main_process:
            self.last_warning_step = step
            warnings.warn(
                f"Codebook collapse at step {step}: the last logging window's {int(tokens)} tokens used only "
                f"{used} of {num_codes} codes (fewer than {DVAE_USAGE_WARNING:.0%} of the {possible} it could use). "
                "Lower the learning rate, lengthen the KL warm-up (kl_warmup_steps) or slow the temperature annealing "
                f"(next warning in {DVAE_WARNING_INTERVAL} steps at the earliest).", RuntimeWarning, stacklevel=2,
            )
        return {"unused_codes_in_window": num_codes - used, "temperature": temperature, "kl_weight": kl_weight}

    def eval_outputs(self, model, pixel_values):
        output = model(pixel_values=pixel_values)  # eval mode: the argmax codes
        mse = (output.reconstruction.float() - pixel_values.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
        return {"pixel_mse": mse}, output.logits.argmax(dim=1)

    def decoded_images(self, tokenizer, indices):
        return tokenizer.decode(indices)

    def recipe(self):
        config = self.config
        return {**super().recipe(), "temperature": f"{config.temperature_start:g} -> {config.temperature_end:g} over "
                f"{config.temperature_anneal_steps} steps ({config.anneal_schedule})",
                "kl_weight": f"0 -> {config.kl_weight:g} over {config.kl_warmup_steps} steps",
                "reconstruction_loss": config.reconstruction_loss, "straight_through": config.straight_through}


__all__ = ["DvaeTokenizerMethod"]
