"""ViT masked patch prediction (Dosovitskiy et al., 2021, section 4.6 and appendix B.1.2).

A plain ViT (learned absolute positions, CLS token, qkv bias) whose pre-training corrupts half
of the patch embeddings BERT-style (80% a learned mask embedding, 10% a random other patch
embedding of the same image, 10% unchanged; see ``masking.corrupt_patch_embeddings``) before the
position embeddings are added, and predicts the 3-bit mean colour of every corrupted patch
(512 classes for RGB) with a linear head and cross-entropy.

The targets come from UNNORMALISED pixels, which the model never sees: the data pipeline computes
``labels`` [B, N] from the [0, 1] image with ``losses.mean_color_targets`` (or
``VitMppForPreTraining.compute_labels``), as BEiT takes its tokenizer's ids. transformers'
``ViTForMaskedImageModeling`` is SimMIM (pixel regression), a different method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .classification import ImageClassificationMixin, pool_tokens
from .configuration_vit_mpp import VitMppConfig
from .encoder import VitEncoderMixin, VitPreTrainedModel
from .inputs import check_bool_masked_pos, check_patch_labels
from .losses import masked_token_losses, mean_color_targets
from .masking import random_patch_selection
from .vit_core import vit_blocks


@dataclass
class VitMppModelOutput(ModelOutput):
    """last_hidden_state [B, 1+N, D] (CLS first, after the final norm when the model has one);
    corruption_branch [B, N] (``masking.NOT_CORRUPTED`` / ``REPLACED_BY_MASK`` /
    ``REPLACED_BY_OTHER_PATCH`` / ``KEPT_UNCHANGED``) when corrupting; hidden_states: the
    embeddings and each block's output."""

    last_hidden_state: torch.FloatTensor | None = None
    corruption_branch: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pooler_output: torch.FloatTensor | None = None  # [B, D]: classification.pool_tokens
    attentions: tuple[torch.FloatTensor, ...] | None = None  # per block [B, H, 1+N, 1+N] (last: tuple indices kept)


@dataclass
class VitMppForPreTrainingOutput(ModelOutput):
    """loss: cross-entropy over the M corrupted patches of the batch (None without labels);
    logits [M, num_color_classes] in row-major order of ``bool_masked_pos`` (sample by sample);
    accuracy over those patches; bool_masked_pos [B, N] the corrupted patches (drawn when not given);
    corruption_branch [B, N] what each patch became; per_sample_loss / per_sample_accuracy [B]: each
    image's over its own corrupted patches (from the same per-patch losses as ``loss``)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    bool_masked_pos: torch.BoolTensor | None = None
    corruption_branch: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    per_sample_loss: torch.FloatTensor | None = None
    per_sample_accuracy: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None  # the encoder's, per block [B, H, 1+N, 1+N]


def check_color_labels(labels: torch.Tensor, batch: int, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """The mean-colour classes of ALL patches, [B, N] (or [B, rows, cols]) -> [B, N] long."""
    return check_patch_labels(
        labels, batch, grid, num_classes, "mean-colour classes",
        f"the head has {num_classes} (color_bits and num_channels of the config)",
        ": compute it from the [0, 1] pixels with VitMppForPreTraining.compute_labels (losses.mean_color_targets); "
        "the model picks the corrupted positions itself.",
        "Compute them with the config's color_bits.")


MASK_HINT = "Build it for the images' patch grid, or pass none and the model draws one (config.mask_ratio)."


class VitMppPreTrainedModel(VitPreTrainedModel):
    hub_auto_map = {
        "AutoModel": "modeling_vit_mpp.VitMppModel",
        "AutoModelForPreTraining": "modeling_vit_mpp.VitMppForPreTraining",
        "AutoModelForImageClassification": "modeling_vit_mpp.VitMppForImageClassification",
    }
    config_class = VitMppConfig
    config: VitMppConfig
    base_model_prefix = "vit"
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """timm's ViT init: truncated normal (std 0.02, cut at +-2, i.e. practically untruncated) for
        Linear and patch-projection weights and the tokens and position table; zero biases;
        LayerNorm ones/zeros."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, VitMppModel):
            for token in (module.cls_token, module.mask_token, module.pos_embed):
                if token is not None:
                    init.trunc_normal_(token, std=std)


class VitMppModel(VitEncoderMixin, VitMppPreTrainedModel):
    """The ViT encoder: the shared ViT encoder with learned absolute positions (bicubically resized for
    other grids) that corrupts the masked patch embeddings BERT-style (before the positions)."""

    _keys_to_ignore_on_load_unexpected = [r"^mpp_head\."]  # the encoder of a pre-training checkpoint

    def __init__(self, config: VitMppConfig, use_mask_token: bool = True, use_final_norm: bool = True):
        super().__init__(config)
        self.build_embeddings(config, position_scheme="learned", masking_mode="corrupt", use_mask_token=use_mask_token,
                              embedding_dropout=config.hidden_dropout_prob)
        blocks = vit_blocks(config, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                            config.intermediate_size, config.drop_path_rate)
        self.build_trunk(blocks, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final_norm else None)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        corrupt_mask: torch.Tensor | None = None,
    ) -> VitMppModelOutput | tuple:
        """``bool_masked_pos`` [B, N] (True = corrupt) corrupts those patch embeddings, drawing the
        80/10/10 branches from `generator` (torch's global RNG when None)."""
        if corrupt_mask is not None:  # the old name: refused rather than silently ignored
            raise TypeError("VitMppModel no longer takes `corrupt_mask`: pass the same mask as `bool_masked_pos` "
                            "(True = corrupt), the mask input every hf_mim model shares.")
        mask = None
        if bool_masked_pos is not None:
            grid = self.patch_embed.grid_size(pixel_values)
            mask = check_bool_masked_pos(bool_masked_pos, pixel_values.shape[0], grid, MASK_HINT)  # [B, N]
        encoded = self.encode(pixel_values, mask=mask, generator=generator,  # [B, 1+N, D]
                              output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        x = encoded.last_hidden_state
        output = VitMppModelOutput(
            last_hidden_state=x, corruption_branch=encoded.corruption_branch, hidden_states=encoded.hidden_states,
            pooler_output=pool_tokens(x, self.config.use_mean_pooling), attentions=encoded.attentions,
        )
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class VitMppForPreTraining(VitMppPreTrainedModel):
    """Masked patch prediction: ``forward(pixel_values, bool_masked_pos=None, labels=None, generator=None)``.

    ``pixel_values`` are the normalised model input; ``labels`` [B, N] the mean-colour classes of
    ALL patches (``compute_labels`` of the [0, 1] pixels); the loss counts the corrupted patches
    only. Without ``bool_masked_pos`` a mask of ``config.mask_ratio`` is drawn per sample.
    """

    def __init__(self, config: VitMppConfig):
        super().__init__(config)
        self.vit = VitMppModel(config)
        self.mpp_head = nn.Linear(config.hidden_size, config.num_color_classes)
        self.post_init()

    def compute_labels(self, pixels_in_0_1: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] unnormalised pixels in [0, 1] -> the mean-colour class of every patch [B, N]."""
        self.vit.patch_embed.grid_size(pixels_in_0_1)  # the channels and size the model takes
        return mean_color_targets(pixels_in_0_1, self.config.patch_size, self.config.color_bits)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> VitMppForPreTrainingOutput | tuple:
        grid = self.vit.patch_embed.grid_size(pixel_values)
        batch, num_patches = pixel_values.shape[0], grid[0] * grid[1]
        if bool_masked_pos is None:
            mask = random_patch_selection(batch, num_patches, self.config.mask_ratio, generator, pixel_values.device)
        else:
            mask = check_bool_masked_pos(bool_masked_pos, batch, grid, MASK_HINT)  # [B, N]
        if labels is not None:
            labels = check_color_labels(labels, batch, grid, self.config.num_color_classes)  # [B, N]
        encoded = self.vit(pixel_values, bool_masked_pos=mask, generator=generator, return_dict=True,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        # The corrupted count M is read once, after the encoder (one graph break under torch.compile).
        samples, patches = mask.nonzero(as_tuple=True)  # [M] each, row-major
        targets = None if labels is None else labels[samples, patches]  # [M]
        logits = self.mpp_head(encoded.last_hidden_state[samples, patches + 1])  # [M, classes] (+1: CLS first)
        losses = {}
        if targets is not None:
            result = masked_token_losses(logits, targets, samples, batch)
            losses = {"loss": result.loss, "accuracy": result.accuracy, "per_sample_loss": result.per_sample_loss,
                      "per_sample_accuracy": result.per_sample_accuracy}
        output = VitMppForPreTrainingOutput(  # built at once: the fields keep their order in tuples
            logits=logits, bool_masked_pos=mask, corruption_branch=encoded.corruption_branch,
            hidden_states=encoded.hidden_states, attentions=encoded.attentions, **losses,
        )
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class VitMppForImageClassification(ImageClassificationMixin, VitMppPreTrainedModel):
    """Fine-tuning: mean-pooled patch tokens -> ``fc_norm`` -> Linear, or the final-normed CLS token
    when ``use_mean_pooling=False`` (the ViT paper); see :class:`ImageClassificationMixin`. The
    mask token and the colour head of a pre-training checkpoint are not used. The head starts near
    zero (the ViT paper fine-tunes from a zero-initialised head)."""

    _keys_to_ignore_on_load_unexpected = [r"^mpp_head\.", r"(^|\.)mask_token$"]

    def __init__(self, config: VitMppConfig):
        super().__init__(config)
        self.vit = VitMppModel(config, use_mask_token=False, use_final_norm=not config.use_mean_pooling)
        self.build_classification_head(config)
        self.post_init()


__all__ = ["VitMppForImageClassification", "VitMppForPreTraining", "VitMppModel", "VitMppPreTrainedModel"]
