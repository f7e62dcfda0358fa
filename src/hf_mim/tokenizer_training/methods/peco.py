"""PeCo's tokenizer (Dong et al., 2023): a VQ-VAE trained with pixel, commitment and perceptual losses from a
frozen ViT, optionally with VQGAN's adversarial loss (its discriminator steps here, never saved).

    python examples/train_tokenizer.py --method peco --perceptual_model outputs/pretrain-mae
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ...cli import option
from ...models import PecoConfig, PecoTokenizer
from ...teachers import TeacherLoadError
from ...training.method import CropOptions
from ...training.optimization import effective_batch_size, resolve_learning_rate
from ..peco_losses import PecoLoss, check_image_size, load_feature_network_for, perceptual_distance
from .base import QuantizerMethod, register_tokenizer_method

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PecoTokenizerOptions(CropOptions):
    _argument_group_name = "PeCo tokenizer (--method peco)"
    perceptual_model: str | None = option(
        help="the frozen perceptual ViT: a transformers vision model id or directory, self-supervised as in the paper "
             "(MoCo v3, DINO, or this package's MAE: `python examples/pretrain.py` writes one to "
             "outputs/pretrain-mae). Never saved.")
    perceptual_layers: list[int] | None = option(
        help="hidden-state indices compared (0 = embeddings, k = block k; default: the config's, ours: 3 6 9 12)")
    perceptual_input_size: int | None = option(help="resize the perceptual network's view to this size")


@register_tokenizer_method
class PecoTokenizerMethod(QuantizerMethod):
    name = "peco"
    title = "PeCo tokenizer"
    options_class = PecoTokenizerOptions
    card_name = "peco_tokenizer"
    summary = ("PeCo (Dong et al., 2023): a VQ-VAE trained with pixel, commitment and perceptual losses from a "
               "frozen ViT")
    config_class = PecoConfig
    model_class = PecoTokenizer
    term_names = ("pixel_loss", "commitment_loss", "perceptual_loss", "adversarial_loss", "adversarial_lambda",
                  "discriminator_loss")
    # Not from the paper (no recipe was published): VQGAN's Adam betas (0.5, 0.9), no weight decay; lr ours.
    defaults = {"base_learning_rate": 1e-4, "adam_beta1": 0.5, "adam_beta2": 0.9, "weight_decay": 0.0,
                "warmup_steps": 0.02, "max_grad_norm": None}
    demo_defaults = {"base_learning_rate": 4e-3, "num_train_epochs": 10.0, "crop_min_scale": 0.5}
    # What the paper confirms, for the card; every other setting is ours.
    PAPER_SETTINGS = {"num_codes": 8192}

    def __init__(self, args):
        super().__init__(args)
        self.loss = None
        self.discriminator_optimizer = None

    def config_knobs(self):
        args, options = self.args, self.options
        knobs = {"image_size": args.image_size} if args.image_size is not None else {}
        if args.patch_size is not None:
            knobs["downsample_factor"] = args.patch_size  # one token per patch_size x patch_size pixels
        for key, value in (("perceptual_network_name_or_path", options.perceptual_model),
                           ("perceptual_layers", options.perceptual_layers),
                           ("perceptual_input_size", options.perceptual_input_size)):
            if value is not None:
                knobs[key] = value
        if args.patch_size is not None and "channel_multipliers" not in (args.config_overrides or ""):
            knobs["channel_multipliers"] = None  # the default widths for the new factor
        return knobs

    def build_model(self, default_preset):
        model = super().build_model(default_preset)
        try:
            network = load_feature_network_for(model.config, **self.auxiliary_hub_kwargs())
        except TeacherLoadError as error:
            raise TeacherLoadError(f"--perceptual_model: {error}") from error
        check_image_size(model.config.image_size, network)
        self.loss = PecoLoss(model.config, network)
        logger.info("Perceptual network: %s, hidden states %s", network.name_or_path, network.layers)
        return model

    @property
    def stride(self) -> int:
        return self.config.downsample_factor

    def auxiliary_networks(self):
        return [self.loss]  # with use_adversarial it holds the discriminator, trained here, never saved

    def setup(self, accelerator):
        super().setup(accelerator)
        if self.loss.discriminator is None:
            return
        args = self.args
        batch = effective_batch_size(args.per_device_train_batch_size, accelerator.num_processes,
                                     args.gradient_accumulation_steps)
        # A constant lr, as VQGAN; the discriminator and its optimiser go into every checkpoint-<step>.
        self.discriminator_optimizer = torch.optim.AdamW(
            self.loss.discriminator.parameters(), lr=resolve_learning_rate(args.learning_rate, args.base_learning_rate,
                                                                           batch),
            betas=(args.adam_beta1, args.adam_beta2), weight_decay=0.0)

    def checkpoint_state(self):
        if self.loss.discriminator is None:
            return {}
        return {"discriminator": self.loss.discriminator, "discriminator_optimizer": self.discriminator_optimizer}

    def discriminator_step(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """One step of D on this batch; its gradients are averaged over processes by hand (D is not
        prepared: it must stay out of the tokenizer's DDP wrapper and of the saved model)."""
        loss = self.loss.discriminator_loss(pixel_values, reconstruction)
        loss.backward()
        parameters = [p for p in self.loss.discriminator.parameters() if p.grad is not None]
        grads = self.accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in parameters]), reduction="mean")
        for parameter, grad in zip(parameters, grads.split([p.numel() for p in parameters])):
            parameter.grad.copy_(grad.view_as(parameter))
        self.discriminator_optimizer.step()
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loss_terms(self, model, pixel_values):
        output = model(pixel_values=pixel_values)
        discriminator_loss = output.pixel_loss.new_zeros(())
        if self.loss.adversarial_active(self.step):
            discriminator_loss = self.discriminator_step(pixel_values, output.reconstruction)
        terms = self.loss(output, pixel_values, step=self.step, last_layer=self.unwrapped(model).last_layer_weight())
        return terms.total, {"pixel_loss": terms.pixel, "commitment_loss": terms.commitment,
                             "perceptual_loss": terms.perceptual, "adversarial_loss": terms.adversarial,
                             "adversarial_lambda": terms.adversarial_lambda,
                             "discriminator_loss": discriminator_loss}, output.indices

    def eval_outputs(self, model, pixel_values):
        output = model(pixel_values=pixel_values)
        reconstruction = output.reconstruction.float().clamp(0, 1)
        mse = (reconstruction - pixel_values.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
        perceptual = perceptual_distance(self.loss.network, pixel_values, output.reconstruction,
                                         self.config.layer_weights)  # [B]
        return {"pixel_mse": mse, "perceptual_loss": perceptual}, output.indices

    def decoded_images(self, tokenizer, indices):
        return tokenizer.decode(indices)

    def provenance(self, name: str, value) -> str:
        paper = self.PAPER_SETTINGS.get(name)
        if paper is None:
            return f"{value} (ours)"
        return f"{value} (paper)" if value == paper else f"{value} (ours; paper: {paper})"

    def recipe(self):
        config = self.config
        settings = {name: getattr(config, name) for name in (
            "num_codes", "code_dim", "downsample_factor", "commitment_weight", "pixel_loss", "pixel_loss_weight",
            "perceptual_layers", "perceptual_weight", "perceptual_feature_norm", "use_adversarial")}
        if config.use_adversarial:
            settings.update({name: getattr(config, name) for name in (
                "adversarial_weight", "adversarial_start_step", "adaptive_adversarial_weight",
                "discriminator_hidden_size", "discriminator_num_layers")})
        return {**super().recipe(),
                "perceptual_network": f"{self.loss.network.name_or_path} (frozen ViT, several depths: paper's idea; "
                                      "paper: MoCo v3)",
                **{name: self.provenance(name, value) for name, value in settings.items()},
                "optimizer": f"AdamW {self.args.adam_beta1, self.args.adam_beta2} (ours, from VQGAN)"}


__all__ = ["PecoTokenizerMethod", "PecoTokenizerOptions"]
