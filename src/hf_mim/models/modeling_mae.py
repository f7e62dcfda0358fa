"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2022).

The encoder sees only the visible patches (plus CLS); a light decoder appends mask tokens,
restores the patch order and regresses the pixels of every patch; the loss counts the removed
patches only. Fixed 2-D sin-cos position tables are non-persistent buffers, regenerated for
whatever grid the input has, so they can never be lost or zeroed by a checkpoint. Fine-tuning
(``MaeForImageClassification``) trains the encoder's table, initialised from the sin-cos one, as the
reference does (``config.learned_position_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .classification import ImageClassificationMixin, pool_tokens
from .configuration_mae import MaeConfig
from .encoder import VitEncoderMixin, VitPreTrainedModel
from .inputs import check_bool_masked_pos, equal_mask_counts
from .losses import masked_mse_losses, normalize_patches
from .masking import gather_tokens, masking_from_mask, random_masking
from .vit_core import patchify, sincos_2d_table, to_2tuple, unpatchify, vit_blocks


@dataclass
class MaeModelOutput(ModelOutput):
    """last_hidden_state [B, 1+K, D] (CLS first; K = kept patches, or all L without masking);
    mask [B, L] (1 = removed); ids_restore [B, L]; hidden_states: input + each block's output."""

    last_hidden_state: torch.FloatTensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pooler_output: torch.FloatTensor | None = None  # [B, D]: classification.pool_tokens
    attentions: tuple[torch.FloatTensor, ...] | None = None  # per block [B, H, 1+K, 1+K] (last: tuple indices kept)


@dataclass
class MaeForPreTrainingOutput(ModelOutput):
    """loss (masked patches only); logits [B, L, p*p*C] per-patch predictions in patch order
    (normalised pixels when `norm_pix_loss`); mask [B, L] (1 = removed); ids_restore [B, L];
    per_sample_loss [B]: each image's mean over its own masked patches (from the same errors as `loss`)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    per_sample_loss: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None  # the encoder's, per block [B, H, 1+K, 1+K]


class MaePreTrainedModel(VitPreTrainedModel):
    hub_auto_map = {
        "AutoModel": "modeling_mae.MaeModel",
        "AutoModelForPreTraining": "modeling_mae.MaeForPreTraining",
        "AutoModelForImageClassification": "modeling_mae.MaeForImageClassification",
    }
    config_class = MaeConfig
    config: MaeConfig
    base_model_prefix = "encoder"
    _no_split_modules = ["Block"]
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The reference MAE init: xavier-uniform Linear and patch projection weights (the projection's
        bias keeps the Conv2d default), normal(0.02) tokens."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # the patch projection (PatchEmbed owns no parameter itself,
            # and transformers skips such modules when initialising custom code)
            weight = module.weight
            if not getattr(weight, "_is_hf_initialized", False):  # a view would lose the loaded flag
                nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            # The reference re-draws only the weight: the bias keeps nn.Conv2d's default, U(+-1/sqrt(fan_in)).
            bound = weight[0].numel() ** -0.5  # fan_in = C * p * p
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, MaeModel):
            init.normal_(module.cls_token, std=self.config.initializer_range)
            init.copy_(module.pos_embed, sincos_2d_table(module.grid_size, self.config.hidden_size))
        elif isinstance(module, MaeDecoder):
            init.normal_(module.mask_token, std=self.config.initializer_range)
            init.copy_(module.pos_embed, sincos_2d_table(module.grid_size, self.config.decoder_hidden_size))


class MaeModel(VitEncoderMixin, MaePreTrainedModel):
    """The MAE encoder: the shared ViT encoder with sin-cos positions that drops the masked patches.
    Without `noise`/`mask_ratio`/`bool_masked_pos` it is a plain feature extractor: every patch token,
    in the original order, after CLS."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]  # loading the encoder of a pre-training checkpoint

    def __init__(self, config: MaeConfig, use_final_norm: bool = True):
        super().__init__(config)
        # learned_position_embeddings: the table is trained from the sin-cos start (fine-tuning)
        self.build_embeddings(config, position_scheme="sincos", masking_mode="drop",
                              learned=config.learned_position_embeddings)
        self.build_trunk(
            vit_blocks(config, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                       config.intermediate_size, config.drop_path_rate),
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final_norm else None,
        )
        self.post_init()

    def choose_kept_patches(self, pixel_values, noise, mask_ratio, bool_masked_pos):
        """(ids_keep [B, K], mask [B, L] 1 = removed, ids_restore [B, L]) from `bool_masked_pos` or from
        `noise` / `mask_ratio`; all None without any of them."""
        if bool_masked_pos is not None:
            if noise is not None or mask_ratio is not None:
                raise ValueError("Pass either bool_masked_pos or noise / mask_ratio, not both: they choose the "
                                 "masked patches two ways.")
            grid = self.patch_embed.grid_size(pixel_values)
            given = check_bool_masked_pos(bool_masked_pos, pixel_values.shape[0], grid)
            return masking_from_mask(given, equal_mask_counts(given))
        if noise is None and mask_ratio is None:
            return None, None, None
        if noise is None:
            rows, cols = self.patch_embed.grid_size(pixel_values)
            noise = torch.rand((pixel_values.shape[0], rows * cols), device=pixel_values.device)  # [B, L]
        return random_masking(noise, self.config.mask_ratio if mask_ratio is None else mask_ratio)

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> MaeModelOutput | tuple:
        """Mask with `bool_masked_pos` [B, L] (True = removed; the same count in every sample), or with
        `noise` [B, L] (uniform; argsort decides) and/or `mask_ratio` when given; else no masking."""
        ids_keep, mask, ids_restore = self.choose_kept_patches(pixel_values, noise, mask_ratio, bool_masked_pos)
        encoded = self.encode(pixel_values, ids_keep=ids_keep, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions)  # [B, 1+K, D]
        x = encoded.last_hidden_state
        output = MaeModelOutput(last_hidden_state=x, mask=mask, ids_restore=ids_restore,
                                hidden_states=encoded.hidden_states, attentions=encoded.attentions,
                                pooler_output=pool_tokens(x, self.config.use_mean_pooling))
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class MaeDecoder(nn.Module):
    """Linear to the decoder width, mask tokens appended and unshuffled, blocks, pixel head."""

    def __init__(self, config: MaeConfig, grid_size: tuple[int, int]):
        super().__init__()
        width = config.decoder_hidden_size
        self.config = config
        self.grid_size = grid_size
        self.embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_2d_table(grid_size, width).unsqueeze(0), persistent=False)
        self.blocks = vit_blocks(
            config, width, config.decoder_num_hidden_layers, config.decoder_num_attention_heads,
            config.decoder_intermediate_size, 0.0,
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        patch_height, patch_width = to_2tuple(config.patch_size)
        self.pred = nn.Linear(width, patch_height * patch_width * config.num_channels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """latent [B, 1+K, D], ids_restore [B, L] -> per-patch predictions [B, L, p*p*C]."""
        x = self.embed(latent)  # [B, 1+K, Dd]
        batch, length, width = x.shape[0], ids_restore.shape[1], x.shape[2]
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, length + 1 - x.shape[1], -1)  # [B, L-K, Dd]
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, L, Dd], shuffled order
        patches = gather_tokens(patches, ids_restore)  # [B, L, Dd], original order
        pos = self.pos_embed if grid == self.grid_size else sincos_2d_table(grid, width).unsqueeze(0)
        x = torch.cat([x[:, :1], patches], dim=1) + pos.to(x)  # [B, 1+L, Dd]
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # [B, L, p*p*C]


class MaeForPreTraining(MaePreTrainedModel):
    def __init__(self, config: MaeConfig):
        super().__init__(config)
        self.encoder = MaeModel(config)
        self.decoder = MaeDecoder(config, self.encoder.grid_size)
        self.post_init()

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C] in the model's patch order."""
        return patchify(pixel_values, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]; `grid_size` defaults to the configured image's grid."""
        grid_size = grid_size or self.encoder.grid_size
        return unpatchify(patches, self.config.patch_size, grid_size, self.config.num_channels)

    def forward_encoder(self, pixel_values, noise, mask_ratio, bool_masked_pos=None,
                        output_hidden_states=None, output_attentions=None) -> MaeModelOutput:
        if bool_masked_pos is None and mask_ratio is None:
            mask_ratio = self.config.mask_ratio  # always masks
        return self.encoder(pixel_values, noise=noise, mask_ratio=mask_ratio, bool_masked_pos=bool_masked_pos,
                            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                            return_dict=True)

    def forward_decoder(self, latent, ids_restore, pixel_values) -> torch.Tensor:
        return self.decoder(latent, ids_restore, self.encoder.patch_embed.grid_size(pixel_values))

    def forward_loss(self, pixel_values, pred, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss over the batch's masked patches, each image's mean over its own [B])."""
        target = self.patchify(pixel_values)  # [B, L, p*p*C]
        if self.config.norm_pix_loss:
            target = normalize_patches(target)
        return masked_mse_losses(pred, target, mask)

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> MaeForPreTrainingOutput | tuple:
        """The masked patches: `bool_masked_pos` [B, L] from the image processor (True = removed; the same
        count in every sample), else drawn from `noise` [B, L] (reproducible) at `mask_ratio` (default: the
        config's), else drawn at random."""
        encoded = self.forward_encoder(pixel_values, noise, mask_ratio, bool_masked_pos, output_hidden_states,
                                       output_attentions)
        pred = self.forward_decoder(encoded.last_hidden_state, encoded.ids_restore, pixel_values)  # [B, L, p*p*C]
        loss, per_sample_loss = self.forward_loss(pixel_values, pred, encoded.mask)
        output = MaeForPreTrainingOutput(
            loss=loss, logits=pred, per_sample_loss=per_sample_loss, mask=encoded.mask,
            ids_restore=encoded.ids_restore, hidden_states=encoded.hidden_states,  # the encoder's, visible tokens
            attentions=encoded.attentions,
        )
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class MaeForImageClassification(ImageClassificationMixin, MaePreTrainedModel):
    """MAE fine-tuning: mean-pooled patch tokens -> `fc_norm` -> Linear (or the normed CLS token
    when `use_mean_pooling=False`); see :class:`ImageClassificationMixin`. The encoder's position
    table is trained, starting from the sin-cos table (a pre-training checkpoint has none to load),
    as in the reference fine-tuning."""

    # A pre-training checkpoint has no encoder table: it starts from the sin-cos one, which is no
    # "newly initialised" weight to warn about.
    _keys_to_ignore_on_load_missing = [r"^encoder\.pos_embed$"]

    def __init__(self, config: MaeConfig):
        config.learned_position_embeddings = True  # saved so: AutoModel on this checkpoint keeps the trained table
        super().__init__(config)
        self.encoder = MaeModel(config, use_final_norm=not config.use_mean_pooling)
        self.build_classification_head(config)
        self.post_init()


__all__ = ["MaeForImageClassification", "MaeForPreTraining", "MaeModel", "MaePreTrainedModel"]
