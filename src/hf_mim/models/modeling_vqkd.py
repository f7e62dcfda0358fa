"""VQ-KD: the visual tokenizer of BEiT v2 (Peng et al., 2022), trained by distilling a frozen teacher.

  pixels [0, 1] -> 2x - 1 -> encoder ViT -> fc_norm per patch token -> encode_task_layer (fp32)
  -> quantize (l2-normalised, nearest code by cosine, EMA codebook) -> decoder ViT (patch size 1
  over the h x w x code_dim code map) -> decode_task_layer -> predicted teacher features [B, N, T]
  loss = mean over patches of (1 - cos(predicted, teacher)) + commitment loss

Parameter names are the reference's (``encoder.*``, ``decoder.*``, ``encode_task_layer.{0,2}``,
``decode_task_layer.{0,2}``, ``quantize.embedding.weight``), so published checkpoints convert by
identity. The teacher is NOT part of this model: the training loop computes its features
(``hf_mim.teachers``) and passes them as ``teacher_features``; tokenizing needs no teacher.

The tokenizer interface shared by hf_mim's tokenizers: ``get_codebook_indices`` ([0, 1] RGB in,
[B, h, w] ids out), ``vocab_size`` and ``token_grid``. VQ-KD reconstructs teacher features, not
pixels, so it has ``decode_features`` and no pixel ``decode``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_vqkd import VqkdConfig
from .encoder import VitEncoderMixin
from .quantizer import EmaVectorQuantizer
from .remote_code import HubCodeMixin
from .visual_tokenizer import VisualTokenizerMixin, check_token_ids
from .vit_core import Attention, grid_size_for, vit_blocks


@dataclass
class VqkdOutput(ModelOutput):
    """loss: distillation_loss + commitment_loss (only with ``teacher_features``); distillation_loss:
    mean over every patch of the batch of 1 - cos(predicted, teacher); commitment_loss: the quantizer's;
    indices [B, h, w]; predicted_features [B, h*w, teacher_dim] (the decoder's output); codebook_usage,
    perplexity, dead_codes: the quantizer's metrics for this batch (all processes in training);
    per_sample_distillation_loss [B]: each image's mean over its own patches (the same distances)."""

    loss: torch.FloatTensor | None = None
    distillation_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    predicted_features: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    dead_codes: torch.LongTensor | None = None
    per_sample_distillation_loss: torch.FloatTensor | None = None


def cosine_distances(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(predicted, target) of every [..., T] vector pair -> [...], computed in float32."""
    predicted = F.normalize(predicted.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return 1.0 - (predicted * target).sum(dim=-1)


def cosine_distillation_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all [..., T] vectors of 1 - cos(predicted, target), computed in float32."""
    return cosine_distances(predicted, target).mean()


def task_layer_float32(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Linear-Tanh-Linear computed in float32 whatever the weights' dtype or autocast (the reference
    disables autocast here; the weights are normally kept float32 by `_keep_in_fp32_modules_strict`)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        for layer in layers:
            if isinstance(layer, nn.Linear):
                bias = None if layer.bias is None else layer.bias.float()
                x = F.linear(x, layer.weight.float(), bias)
            else:
                x = layer(x)
        return x


class VqkdViT(VitEncoderMixin, nn.Module):
    """The reference's ViT with mean-pooling head, returning patch tokens: the shared ViT encoder with
    learned absolute positions (bicubic-resized for other grids), blocks with BEiT q/v biases and no
    layer scale or relative bias, then ``fc_norm`` on every patch token (``norm`` and ``head`` are
    identities in the reference and own no weights). Encoder: patches of pixels; decoder: patch size 1
    over the code map."""

    def __init__(self, config: VqkdConfig, *, width: int, depth: int, heads: int, mlp_dim: int,
                 patch_size, in_channels: int, grid_size: tuple[int, int], drop_path: float):
        super().__init__()
        self.config = config
        self.build_embeddings(config, width=width, patch_size=patch_size, num_channels=in_channels,
                              grid_size=grid_size, position_scheme="learned", masking_mode=None,
                              embedding_dropout=config.hidden_dropout_prob)
        blocks = vit_blocks(config, width, depth, heads, mlp_dim, drop_path, qv_bias=config.qkv_bias)
        # The reference init divides the residual output projections of block i (1-based) by sqrt(2 i).
        for layer_id, block in enumerate(blocks, start=1):
            block.attn.proj.residual_layer_id = layer_id
            block.mlp.fc2.residual_layer_id = layer_id
        self.build_trunk(blocks, norm=None)
        self.fc_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> normed patch tokens [B, rows*cols, D]."""
        tokens = self.encode(x, output_hidden_states=False, output_attentions=False).last_hidden_state  # [B, 1+N, D]
        return self.fc_norm(tokens[:, 1:])  # [B, N, D]


class VqkdTokenizer(VisualTokenizerMixin, HubCodeMixin, PreTrainedModel):
    """BEiT v2's VQ-KD tokenizer: ``get_codebook_indices`` for MIM targets, ``forward`` for training
    (with the teacher's patch features as ``teacher_features``)."""

    hub_auto_map = {"AutoModel": "modeling_vqkd.VqkdTokenizer"}
    pixel_mapping = "maps [0, 1] to [-1, 1] itself (and the teacher applies its own normalisation)"
    config_class = VqkdConfig
    config: VqkdConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # The codebook's k-means/EMA updates and the projection to the code space run in float32.
    _keep_in_fp32_modules_strict = ["quantize", "encode_task_layer"]
    # Reference statistics hf_mim does not keep (the converter drops them; listed in case a raw
    # reference state dict is loaded with from_pretrained(state_dict=...)).
    _keys_to_ignore_on_load_unexpected = [
        r"^quantize\.cluster_size$", r"^quantize\.embedding\.(cluster_size|embed_avg)$",
    ]

    def __init__(self, config: VqkdConfig):
        super().__init__(config)
        self.grid_size = grid_size_for(config.image_size, config.patch_size)
        width, decoder_width = config.hidden_size, config.decoder_hidden_size
        self.encoder = VqkdViT(
            config, width=width, depth=config.num_hidden_layers, heads=config.num_attention_heads,
            mlp_dim=config.intermediate_size, patch_size=config.patch_size, in_channels=config.num_channels,
            grid_size=self.grid_size, drop_path=config.drop_path_rate,
        )
        self.encode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, config.code_dim))
        self.quantize = EmaVectorQuantizer(
            config.num_codes, config.code_dim, decay=config.decay, kmeans_init=config.kmeans_init,
            kmeans_iters=config.kmeans_iters, commitment_weight=config.commitment_weight,
            dead_code_restart=config.dead_code_restart, dead_code_threshold=config.dead_code_threshold,
            usage_warning_threshold=config.usage_warning_threshold,
        )
        self.decoder = VqkdViT(
            config, width=decoder_width, depth=config.decoder_num_hidden_layers,
            heads=config.decoder_num_attention_heads, mlp_dim=config.decoder_intermediate_size, patch_size=1,
            in_channels=config.code_dim, grid_size=self.grid_size, drop_path=0.0,
        )
        self.decode_task_layer = nn.Sequential(
            nn.Linear(decoder_width, decoder_width), nn.Tanh(), nn.Linear(decoder_width, config.teacher_dim)
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The reference init (beit2's VisionTransformer and VQKD): Linear weights, CLS and position
        tables truncated normal std 0.02 (timm's default cut at +-2, i.e. in effect a normal), biases 0;
        the residual projections of block i then divided by sqrt(2 i) when freshly drawn; the patch
        convolutions keep PyTorch's default init; the quantizer gets a fresh random codebook."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            fresh = not getattr(module.weight, "_is_hf_initialized", False)
            init.trunc_normal_(module.weight, std=std)
            layer_id = getattr(module, "residual_layer_id", None)
            if fresh and layer_id is not None:
                module.weight.div_(math.sqrt(2.0 * layer_id))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # nn.Conv2d.reset_parameters, through the loaded-aware helpers
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            fan_in = module.weight[0].numel()
            init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, Attention) and module.q_bias is not None:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, VqkdViT):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
        elif isinstance(module, EmaVectorQuantizer):
            module.reset_state(init.copy_)

    # ------------------------------------------------------------------ tokenizer interface

    def token_grid(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """(h, w) of the token grid for an image of `image_size` (int or (height, width))."""
        return grid_size_for(image_size, self.config.patch_size)

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB [B, C, H, W] -> features before quantization [B, h, w, code_dim], float32."""
        self.check_pixels(pixel_values)
        return self.encode_checked_pixels(pixel_values)

    def encode_checked_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.encoder.patch_embed.proj.weight
        tokens = self.encoder((2.0 * pixel_values - 1.0).to(weight.dtype))  # [B, N, D]
        features = task_layer_float32(self.encode_task_layer, tokens)  # [B, N, code_dim]
        rows, cols = self.token_grid(tuple(pixel_values.shape[-2:]))
        return features.reshape(features.shape[0], rows, cols, -1)  # [B, h, w, code_dim]

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """[0, 1] RGB [B, C, H, W] -> token ids [B, h, w] (nearest code by cosine; no codebook update)."""
        return self.quantize.encode(self.encode_features(pixel_values))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, h, w, code_dim] -> predicted teacher features [B, h*w, teacher_dim]."""
        weight = self.decoder.patch_embed.proj.weight
        # contiguous: a permuted input gives the patch conv channels-last weight gradients (slow under DDP).
        tokens = self.decoder(codes.permute(0, 3, 1, 2).to(weight.dtype).contiguous())  # [B, N, Dd]
        return self.decode_task_layer(tokens)  # [B, N, T]

    @torch.no_grad()
    def decode_features(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> the teacher features the decoder predicts from them [B, h*w, teacher_dim]."""
        return self.decode_codes(self.quantize.decode_indices(check_token_ids(indices, self.vocab_size)))

    # ------------------------------------------------------------------ training

    def check_teacher_features(self, teacher_features: torch.Tensor, expected: tuple[int, int, int]) -> torch.Tensor:
        """teacher_features [B, N, T] or [B, h, w, T] -> [B, N, T]; shape, dtype and finiteness checked."""
        batch, length, dim = expected
        if teacher_features.ndim == 4:
            teacher_features = teacher_features.flatten(1, 2)
        if tuple(teacher_features.shape) != (batch, length, dim):
            problem = ""
            if teacher_features.ndim == 3 and teacher_features.shape[-1] != dim:
                problem = (f" The teacher gives {teacher_features.shape[-1]}-dim features: build the tokenizer with "
                           f"teacher_dim={teacher_features.shape[-1]}.")
            elif teacher_features.ndim == 3 and teacher_features.shape[1] != length:
                problem = (" The teacher's patch grid differs from the tokenizer's: feed the teacher images whose grid "
                           "matches (hf_mim.teachers.load_teacher(..., input_size=...)), without CLS/register tokens.")
            raise ValueError(
                f"teacher_features has shape {list(teacher_features.shape)}, expected [{batch}, {length}, {dim}] "
                f"(batch, patches in row-major order, teacher_dim).{problem}"
            )
        if not teacher_features.is_floating_point():
            raise ValueError(f"teacher_features must be floating point, got {teacher_features.dtype}.")
        if not bool(torch.isfinite(teacher_features).all()):
            raise FloatingPointError(
                "teacher_features hold NaN or inf: the teacher forward failed on this batch (before the tokenizer). "
                "Check the teacher's weights and its input normalisation, or run it in float32."
            )
        return teacher_features

    def forward(
        self,
        pixel_values: torch.Tensor,
        teacher_features: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VqkdOutput:
        """[0, 1] RGB [B, C, H, W]; `teacher_features` [B, h*w, teacher_dim]: the teacher's patch features
        of the same images (required in training: each training forward also updates the codebook)."""
        if self.training and teacher_features is None:
            raise ValueError(
                "VqkdTokenizer.forward in training mode needs teacher_features (every training forward also takes "
                "an EMA step of the codebook): compute them with hf_mim.teachers.load_teacher_for(config), or call "
                "model.eval() / get_codebook_indices to tokenize."
            )
        self.check_pixels(pixel_values)
        target = None
        if teacher_features is not None:  # checked before the quantizer's training step touches the codebook
            rows, cols = self.token_grid(tuple(pixel_values.shape[-2:]))
            expected = (pixel_values.shape[0], rows * cols, self.config.teacher_dim)
            target = self.check_teacher_features(teacher_features, expected)  # [B, N, T]
        features = self.encode_checked_pixels(pixel_values)  # [B, h, w, code_dim] float32
        quantized = self.quantize(features)  # straight-through codes [B, h, w, code_dim], indices [B, h, w]
        predicted = self.decode_codes(quantized.quantized)  # [B, N, T]
        output = VqkdOutput(
            commitment_loss=quantized.commitment_loss, indices=quantized.indices, predicted_features=predicted,
            codebook_usage=quantized.codebook_usage, perplexity=quantized.perplexity, dead_codes=quantized.dead_codes,
        )
        if target is not None:
            distances = cosine_distances(predicted, target)  # [B, N]
            output.distillation_loss = distances.mean()
            output.per_sample_distillation_loss = distances.mean(dim=-1)  # [B]
            if not bool(torch.isfinite(output.distillation_loss)):
                raise FloatingPointError(
                    "The distillation loss is NaN or inf: the decoder's predictions are not finite (the encoder and "
                    "the quantizer were fine). Lower the learning rate or train in bf16/fp32 rather than fp16."
                )
            output.loss = output.distillation_loss + output.commitment_loss
        return output


__all__ = ["VqkdOutput", "VqkdTokenizer", "VqkdViT", "cosine_distillation_loss"]
