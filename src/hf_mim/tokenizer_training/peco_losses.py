"""PeCo's training objective: pixels + codebook commitment + a perceptual term from a frozen ViT.

  loss = pixel_loss_weight * pixel_loss + commitment_loss + perceptual_weight * perceptual_loss

  perceptual_loss = sum over l in perceptual_layers of  w_l * mean over (patches, channels) of
                    (norm(f_l(x)) - norm(f_l(x_hat)))**2

where f_l are the patch tokens of ``hidden_states[l]`` of the frozen network (0 = embeddings, k = block k),
``norm`` is ``perceptual_feature_norm`` ("l2": unit vectors per token, "layer_norm": zero mean and unit
variance per token without affine weights, "none"), x the input and x_hat the reconstruction, both on the
[0, 1] scale. The paper confirms only the idea (deep features of a frozen self-supervised ViT at several
depths); the layers, weights and normalisation are this project's choices (config fields).

The network is frozen (no parameter gets a gradient, always in eval mode), but the reconstruction branch
is differentiable, so the tokenizer learns from it. It is never part of the tokenizer checkpoint.

Optional adversarial term (VQGAN's, `use_adversarial`): from optimiser step `adversarial_start_step` on,
a PatchGAN discriminator D (hinge loss) is trained on the input (real) and the detached reconstruction
(fake), and the tokenizer adds  adversarial_weight * lambda * (-mean D(x_hat)),  lambda = ||grad nll|| /
(||grad adv|| + 1e-4) at the decoder's last layer (clamped to [0, 1e4]) when `adaptive_adversarial_weight`,
else 1; nll = the weighted pixel + perceptual terms. Ours: D takes its step on this batch BEFORE the
tokenizer's adversarial term is computed (VQGAN: after), so that D's weights are not changed in place
between the tokenizer's forward and backward. D is never part of the tokenizer checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vit_core import to_2tuple
from ..teachers import Teacher, load_teacher


class PerceptualNetwork(nn.Module):
    """Patch-token features at several depths of a frozen transformers ViT, differentiable w.r.t. the image.

    Built from a loaded :class:`hf_mim.teachers.Teacher` (which did the loading, the weight checks and
    the normalisation lookup); unlike the teacher's own forward, nothing here is under `no_grad` and the
    pixels are neither clamped nor range-checked: an early reconstruction may overshoot [0, 1]."""

    def __init__(self, teacher: Teacher, layers: Sequence[int], feature_norm: str = "l2"):
        super().__init__()
        self.model = teacher.model.eval().requires_grad_(False)
        self.name_or_path, self.patch_size = teacher.name_or_path, teacher.patch_size
        self.input_size = teacher.input_size
        self.layers, self.feature_norm = [int(layer) for layer in layers], feature_norm
        self.register_buffer("image_mean", teacher.image_mean.clone(), persistent=False)  # [1, C, 1, 1]
        self.register_buffer("image_std", teacher.image_std.clone(), persistent=False)  # [1, C, 1, 1]
        self.native_size = teacher.native_size
        self.accepts_interpolation = teacher.accepts_interpolation
        self.check_layers()

    def train(self, mode: bool = True) -> PerceptualNetwork:
        return super().train(False)  # frozen: no dropout whatever the caller's mode

    def check_layers(self) -> None:
        depth = getattr(self.model.config, "num_hidden_layers", None)
        if depth is not None and max(self.layers) > depth:
            raise ValueError(
                f"perceptual_layers {self.layers} ask for hidden states up to {max(self.layers)}, but the perceptual "
                f"network {self.name_or_path} has {depth} blocks (hidden states 0 to {depth}): set perceptual_layers "
                f"within that range, e.g. --config_overrides \"perceptual_layers={list(range(1, depth + 1))}\"."
            )

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1]-scale pixels [B, C, H, W] -> the network's input (resized to `input_size` if set)."""
        x = pixels.float()
        size = self.input_size or tuple(x.shape[-2:])
        if tuple(size) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        height, width = x.shape[-2:]
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(
                f"The perceptual network {self.name_or_path} has patch size {self.patch_size}, which does not divide "
                f"{height}x{width} images: set perceptual_input_size to a multiple of it."
            )
        dtype = next(self.model.parameters()).dtype
        return ((x - self.image_mean) / self.image_std).to(dtype)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[0, 1]-scale pixels [B, C, H, W] -> one normalised feature map [B, N, D] per perceptual layer."""
        x = self.normalize(pixels)
        num_patches = (x.shape[-2] // self.patch_size[0]) * (x.shape[-1] // self.patch_size[1])
        kwargs = {}
        if self.accepts_interpolation and self.native_size is not None and tuple(x.shape[-2:]) != self.native_size:
            kwargs["interpolate_pos_encoding"] = True
        states = self.model(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states
        features = []
        for layer in self.layers:
            tokens = states[layer][:, -num_patches:].float()  # [B, N, D]: CLS / register tokens come first
            features.append(normalize_features(tokens, self.feature_norm))
        return features


def normalize_features(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, N, D] -> [B, N, D] normalised per token: why: deep layers have growing norms, and without it the
    deepest layer would dominate the sum."""
    if kind == "l2":
        return F.normalize(tokens, dim=-1)
    if kind == "layer_norm":
        return F.layer_norm(tokens, tokens.shape[-1:])
    if kind == "none":
        return tokens
    raise ValueError(f"perceptual_feature_norm must be 'l2', 'layer_norm' or 'none', got {kind!r}.")


def load_feature_network_for(config, **kwargs) -> PerceptualNetwork:
    """The frozen perceptual network a PecoConfig names (`perceptual_network_name_or_path`, loaded by id or
    directory like a VQ-KD teacher), at its `perceptual_layers`. Keyword arguments go to `load_teacher`."""
    if not config.perceptual_network_name_or_path:
        raise ValueError(
            "The PeCo config names no perceptual network: pass --perceptual_model (a transformers ViT id or "
            "directory; a self-supervised one as in the paper, e.g. this package's MAE from examples/pretrain.py)."
        )
    teacher = load_teacher(
        config.perceptual_network_name_or_path, teacher_type="auto", input_size=config.perceptual_input_size,
        image_mean=config.perceptual_image_mean, image_std=config.perceptual_image_std, **kwargs,
    )
    return PerceptualNetwork(teacher, config.perceptual_layers, config.perceptual_feature_norm)


def perceptual_distance(network: PerceptualNetwork, pixels: torch.Tensor, reconstruction: torch.Tensor,
                        layer_weights: Sequence[float]) -> torch.Tensor:
    """Per image [B]: sum over layers of weight * mean squared distance of the normalised features. The
    input's features carry no gradient; the reconstruction's do (to the reconstruction, not the network)."""
    with torch.no_grad():
        targets = network(pixels)  # list of [B, N, D]
    predictions = network(reconstruction)
    per_image = pixels.new_zeros(pixels.shape[0], dtype=torch.float32)  # [B]
    for weight, target, prediction in zip(layer_weights, targets, predictions):
        per_image = per_image + weight * (prediction - target).pow(2).mean(dim=(1, 2))
    return per_image


class PatchDiscriminator(nn.Module):
    """VQGAN's PatchGAN discriminator: [-1, 1] images [B, C, H, W] -> real/fake logits [B, 1, h', w']. A 4x4
    stride-2 conv + LeakyReLU(0.2), then `num_layers` 4x4 convs (stride 2 but the last, widths doubling up to
    8x) each with BatchNorm + LeakyReLU, then a 4x4 conv to one logit per patch."""

    def __init__(self, in_channels: int, hidden_size: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden_size, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = hidden_size
        for index in range(1, num_layers + 1):
            out = hidden_size * min(2**index, 8)
            layers += [nn.Conv2d(width, out, 4, 2 if index < num_layers else 1, 1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def adaptive_weight(nll: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's lambda: the ratio of the gradient norms of the two losses at the decoder's last layer, so that
    the adversarial term neither drowns nor is drowned by the reconstruction terms."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    adversarial_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (adversarial_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@dataclass
class PecoLossTerms:
    """Scalars of one batch: total (what is minimised), pixel, commitment and perceptual terms (unweighted
    pixel and perceptual, the commitment already times commitment_weight); adversarial: the tokenizer's
    -mean D(x_hat) and its lambda (0 while the term is off)."""

    total: torch.Tensor
    pixel: torch.Tensor
    commitment: torch.Tensor
    perceptual: torch.Tensor
    adversarial: torch.Tensor | None = None
    adversarial_lambda: torch.Tensor | None = None


class PecoLoss(nn.Module):
    """Combines a PecoTokenizer's output with the perceptual (and optional adversarial) terms, weighted by
    the tokenizer's config. Owns the frozen perceptual network and, with `use_adversarial`, the
    discriminator (trained by the caller with `discriminator_loss`)."""

    def __init__(self, config, network: PerceptualNetwork):
        super().__init__()
        self.config, self.network = config, network
        self.discriminator = None
        if config.use_adversarial:
            self.discriminator = PatchDiscriminator(config.num_channels, config.discriminator_hidden_size,
                                                    config.discriminator_num_layers)

    def adversarial_active(self, step: int | None) -> bool:
        return self.discriminator is not None and step is not None and step >= self.config.adversarial_start_step

    def forward(self, output, pixel_values: torch.Tensor, step: int | None = None,
                last_layer: torch.Tensor | None = None) -> PecoLossTerms:
        """`output`: PecoTokenizer's forward on `pixel_values` ([0, 1] [B, C, H, W]); `step`: the optimiser
        step (the adversarial term starts at adversarial_start_step); `last_layer`: the decoder's last weight
        (for the adaptive lambda)."""
        config = self.config
        perceptual = perceptual_distance(self.network, pixel_values, output.reconstruction,
                                         config.layer_weights).mean()
        nll = config.pixel_loss_weight * output.pixel_loss + config.perceptual_weight * perceptual
        zero = nll.new_zeros(())
        terms = PecoLossTerms(total=nll + output.commitment_loss, pixel=output.pixel_loss,
                              commitment=output.commitment_loss, perceptual=perceptual, adversarial=zero,
                              adversarial_lambda=zero)
        if self.adversarial_active(step):
            self.discriminator.requires_grad_(False)  # the tokenizer's term must not train D
            adversarial = -self.discriminator(2.0 * output.reconstruction - 1.0).float().mean()
            lam = adaptive_weight(nll, adversarial, last_layer) if config.adaptive_adversarial_weight else zero + 1
            terms.total = terms.total + config.adversarial_weight * lam * adversarial
            terms.adversarial, terms.adversarial_lambda = adversarial, lam
        return terms

    def discriminator_loss(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """The hinge loss of D on real images and DETACHED reconstructions (both [0, 1] scale)."""
        self.discriminator.requires_grad_(True)
        real = self.discriminator(2.0 * pixel_values - 1.0)
        fake = self.discriminator(2.0 * reconstruction.detach() - 1.0)
        return hinge_discriminator_loss(real, fake)


def check_image_size(size, network: PerceptualNetwork) -> None:
    """Fail before training when the tokenizer's images cannot be fed to the network."""
    height, width = network.input_size or to_2tuple(size)
    if height % network.patch_size[0] or width % network.patch_size[1]:
        raise ValueError(
            f"The perceptual network {network.name_or_path} (patch size {network.patch_size}) cannot take "
            f"{height}x{width} images: set perceptual_input_size to a multiple of its patch size."
        )


__all__ = ["PatchDiscriminator", "PecoLoss", "PecoLossTerms", "PerceptualNetwork", "adaptive_weight",
           "check_image_size", "hinge_discriminator_loss", "load_feature_network_for", "normalize_features",
           "perceptual_distance"]
