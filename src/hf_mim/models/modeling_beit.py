"""BEiT (Bao et al., 2022) and BEiT v2 (Peng et al., 2022): masked image modeling with visual-token targets.

Masked patches are replaced by a learned ``mask_token`` before any position information, the
transformer sees every token (CLS first), and an LM head predicts the visual-token id of each
masked patch (the ids come from a frozen tokenizer: the DALL-E dVAE for v1, VQ-KD for v2). The
loss is the cross-entropy over all masked tokens of the batch. Blocks are ``vit_core.Block`` with
BEiT's q/v biases and layer scale; positions come from a relative position bias (one table shared
by all blocks in pre-training, one per block in fine-tuning). BEiT v2 adds a CLS-aggregation head
(``cls_pt_layers``, with its own ``cls_pt_norm`` and ``cls_pt_lm_head`` when ``shared_lm_head=False``)
whose loss is added 1:1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import load_state_dict
from transformers.utils import ModelOutput

from .classification import ImageClassificationMixin, pool_tokens
from .configuration_beit import BEiTConfig
from .encoder import VitEncoderMixin, VitPreTrainedModel
from .inputs import check_bool_masked_pos, check_patch_labels
from .losses import masked_token_losses
from .relative_position import RelativePositionBias, relative_position_index
from .vit_core import Attention, Block, drop_path_rates

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


@dataclass
class BEiTModelOutput(ModelOutput):
    """last_hidden_state [B, 1+N, D] (CLS first, after the final norm when the model has one);
    hidden_states: the embeddings and each block's output, before the final norm."""

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pooler_output: torch.FloatTensor | None = None  # [B, D]: classification.pool_tokens
    attentions: tuple[torch.FloatTensor, ...] | None = None  # per block [B, H, 1+N, 1+N] (last: tuple indices kept)


@dataclass
class BEiTForMaskedImageModelingOutput(ModelOutput):
    """loss: ``mim_loss`` (+ ``cls_head_loss`` with the BEiT v2 head); logits [M, vocab] for the M
    masked patches of the batch, in row-major order of ``bool_masked_pos`` (sample by sample);
    accuracy: masked-token accuracy of ``logits``. The ``cls_head_*`` fields are the v2 head's.
    per_sample_loss [B]: each image's ``loss`` over its own masked patches (mim + cls head, from the same
    per-token losses); per_sample_accuracy [B] likewise."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    mim_loss: torch.FloatTensor | None = None
    cls_head_loss: torch.FloatTensor | None = None
    cls_head_logits: torch.FloatTensor | None = None
    cls_head_accuracy: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    per_sample_loss: torch.FloatTensor | None = None
    per_sample_accuracy: torch.FloatTensor | None = None
    cls_head_per_sample_loss: torch.FloatTensor | None = None
    cls_head_per_sample_accuracy: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None  # the encoder's, per block [B, H, 1+N, 1+N]


# ---------------------------------------------------------------------------------------------
# Input checks and the loss
# ---------------------------------------------------------------------------------------------


def check_labels(labels: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int], vocab_size: int) -> torch.Tensor:
    """The visual-token ids of ALL patches, [B, N] (or [B, rows, cols]) -> [B, N] long."""
    return check_patch_labels(
        labels, mask.shape[0], grid, vocab_size, "visual-token ids", f"the LM head has vocab_size={vocab_size}",
        " (transformers' BeitForMaskedImageModeling takes only the masked ones; pass the full token map, the model "
        "picks the masked positions itself).",
        "Build the model with vocab_size equal to the tokenizer's codebook size (8192 for the DALL-E dVAE and VQ-KD).")


def required_mask(bool_masked_pos: torch.Tensor | None, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    if bool_masked_pos is None:
        raise ValueError(
            "BEiT pre-training needs `bool_masked_pos` [batch, num_patches] (True = masked); build it with "
            "hf_mim's blockwise mask generator or the image processor."
        )
    return check_bool_masked_pos(bool_masked_pos, batch, grid)  # [B, N]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class BEiTBlock(Block):
    """``vit_core.Block`` with BEiT's q/v biases and layer scale; with per-block relative position
    bias (fine-tuning) it also owns a table, added to the shared bias it is given (if any)."""

    def __init__(self, config: BEiTConfig, grid_size: tuple[int, int], drop_path: float, layer_id: int):
        super().__init__(
            config, config.hidden_size, config.num_attention_heads, config.intermediate_size, qv_bias=True,
            layer_scale_init=config.layer_scale_init_value if config.uses_layer_scale else None,
            drop_path=drop_path, drop=config.hidden_dropout_prob, attn_drop=config.attention_probs_dropout_prob,
            act=config.hidden_act, eps=config.layer_norm_eps,
        )
        use_own = config.use_relative_position_bias
        self.rel_pos_bias = RelativePositionBias(grid_size, config.num_attention_heads) if use_own else None
        # The reference init divides the residual output projections by sqrt(2 * layer_id); the
        # Linear layers carry their layer id so that `_init_weights` does it right after drawing them.
        for linear in (self.attn.proj, self.mlp.fc2):
            linear.residual_layer_id = layer_id

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, grid_size=None,
                output_attentions: bool = False):
        if self.rel_pos_bias is not None:
            own = self.rel_pos_bias(grid_size).unsqueeze(0)  # [1, H, 1+N, 1+N]
            attn_bias = own if attn_bias is None else attn_bias + own
        return super().forward(x, attn_bias, output_attentions=output_attentions)


def build_blocks(config: BEiTConfig, grid_size: tuple[int, int], depths: range) -> nn.ModuleList:
    """Blocks at the given depths (0-based): the drop-path rate and init layer id (depth + 1) of that depth.
    The rates are ``linspace(0, drop_path_rate, max(num_hidden_layers, depths.stop))``: the encoder's for
    the encoder's blocks and, as in beit2, a longer ramp when the v2 head's depths run past the encoder."""
    rates = drop_path_rates(config.drop_path_rate, max(config.num_hidden_layers, depths.stop))
    return nn.ModuleList(BEiTBlock(config, grid_size, rates[depth], layer_id=depth + 1) for depth in depths)


def use_torch_default_init(module: nn.Module) -> nn.Module:
    """Mark the Linear layers under `module` to keep PyTorch's default init (then the residual
    rescale): beit2 builds its CLS-head blocks after its init pass, so they never get the truncated normal."""
    for linear in module.modules():
        if isinstance(linear, nn.Linear):
            linear.torch_default_init = True
    return module


def expand_shared_relative_position_bias(state_dict: dict, model_keys) -> dict | None:
    """A checkpoint with the pre-training layout (one shared relative position table) for a model
    with one table per block: the state dict with the shared table copied into every block's table
    (and the shared entry dropped), or None when the layouts already agree.

    Keys are as transformers sees them: the model's may carry the ``beit.`` prefix, the
    checkpoint's whatever prefix it was saved with (transformers reconciles the two afterwards).
    Raises when a per-block checkpoint meets a shared-table model: the table would be lost.
    """
    def is_table(key: str) -> bool:
        return key.endswith(SHARED_TABLE)

    def is_per_block(key: str) -> bool:
        return is_table(key) and ("blocks." in key or "cls_pt_layers." in key)

    stored_shared = [k for k in state_dict if is_table(k) and not is_per_block(k)]
    stored_per_block = [k for k in state_dict if is_per_block(k)]
    model_shared = [k for k in model_keys if is_table(k) and not is_per_block(k)]
    model_per_block = [k for k in model_keys if is_per_block(k)]
    if model_shared and stored_per_block and not stored_shared:
        raise ValueError(
            "The checkpoint has one relative position bias table per block (fine-tuning layout) but the model "
            "is configured with a shared table. Load it with use_shared_relative_position_bias=False, "
            "use_relative_position_bias=True."
        )
    if not model_per_block or not stored_shared or stored_per_block:
        return None
    source = stored_shared[0]
    prefix = source[: -len(SHARED_TABLE)]  # "beit." from a pre-training/classification checkpoint, "" from a BEiTModel
    expanded = {k: v for k, v in state_dict.items() if k != source}
    for key in model_per_block:
        if key.startswith("cls_pt_layers."):
            if prefix:  # the v2 head lives next to `beit.`, so only a full pre-training checkpoint addresses it
                expanded[key] = state_dict[source]
        else:
            expanded[prefix + key.removeprefix("beit.")] = state_dict[source]
    return expanded


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class BEiTPreTrainedModel(VitPreTrainedModel):
    hub_auto_map = {
        "AutoModel": "modeling_beit.BEiTModel",
        "AutoModelForPreTraining": "modeling_beit.BEiTForMaskedImageModeling",
        "AutoModelForImageClassification": "modeling_beit.BEiTForImageClassification",
    }
    config_class = BEiTConfig
    config: BEiTConfig
    base_model_prefix = "beit"
    _no_split_modules = ["BEiTBlock"]
    _supports_flash_attn = False  # the relative position bias is an additive float mask
    _supports_flex_attn = False  # transformers' flex path reads one mask head for all heads
    _keys_to_ignore_on_load_unexpected = [r"relative_position_index"]  # a buffer the reference stores

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The reference pre-training init: truncated normal (std 0.02 cut at +-0.02) for Linear and
        conv weights and the tokens, zero biases and relative tables, layer scales at their init
        value; the residual projections of the block at layer id i (1-based) then divided by
        sqrt(2 * i), only when freshly drawn (a weight loaded from a checkpoint carries
        ``_is_hf_initialized`` and is neither redrawn nor rescaled). The BEiT v2 CLS-head blocks keep
        PyTorch's default Linear init before that rescale, as in beit2."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fresh = not getattr(module.weight, "_is_hf_initialized", False)
            if getattr(module, "torch_default_init", False):
                # nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias alike
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    bound = module.weight.shape[1] ** -0.5
                    init.uniform_(module.bias, -bound, bound)
            else:
                init.trunc_normal_(module.weight, std=std, a=-std, b=std)
                if module.bias is not None:
                    init.zeros_(module.bias)
            layer_id = getattr(module, "residual_layer_id", None)
            if fresh and layer_id is not None:
                module.weight.div_(math.sqrt(2.0 * layer_id))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RelativePositionBias):
            init.zeros_(module.relative_position_bias_table)
            init.copy_(module.relative_position_index, relative_position_index(module.grid_size))
        elif isinstance(module, Attention) and module.q_bias is not None:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, Block) and module.gamma_1 is not None:
            init.constant_(module.gamma_1, self.config.layer_scale_init_value)
            init.constant_(module.gamma_2, self.config.layer_scale_init_value)
        elif isinstance(module, BEiTModel):
            for token in (module.cls_token, module.mask_token, module.pos_embed):
                if token is not None:
                    init.trunc_normal_(token, std=std, a=-std, b=std)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        """Loading a pre-training checkpoint (one shared relative position table) into a model with
        per-block tables copies the shared table into every block (the reference fine-tuning recipe).
        The checkpoint's keys are read first (metadata only); tensors are read here only to expand."""
        per_block = any(isinstance(m, BEiTBlock) and m.rel_pos_bias is not None for m in model.modules())
        shared = any(isinstance(m, BEiTModel) and m.rel_pos_bias is not None for m in model.modules())
        if (per_block or shared) and (state_dict is not None or checkpoint_files):
            files = [] if state_dict is not None else checkpoint_files
            keys = dict(state_dict or {})
            for file in files:
                keys.update(load_state_dict(file, map_location="meta"))
            if expand_shared_relative_position_bias(keys, model.state_dict().keys()) is not None:
                full = dict(state_dict or {})
                for file in files:
                    full.update(load_state_dict(file))
                state_dict = expand_shared_relative_position_bias(full, model.state_dict().keys())
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs)


class BEiTModel(VitEncoderMixin, BEiTPreTrainedModel):
    """The BEiT encoder: the shared ViT encoder replacing masked patches by the mask token (before the
    positions), with optional learned absolute positions and BEiT's relative position bias (one table
    shared by all blocks, or one per block)."""

    _keys_to_ignore_on_load_unexpected = [r"relative_position_index", r"^lm_head\.", r"^cls_pt_(layers|norm|lm_head)\."]

    def __init__(self, config: BEiTConfig, use_mask_token: bool = True, use_final_norm: bool = True):
        super().__init__(config)
        self.build_embeddings(
            config, position_scheme="learned" if config.use_absolute_position_embeddings else "relative",
            masking_mode="replace", use_mask_token=use_mask_token, embedding_dropout=config.hidden_dropout_prob,
        )
        use_shared = config.use_shared_relative_position_bias
        self.rel_pos_bias = RelativePositionBias(self.grid_size, config.num_attention_heads) if use_shared else None
        self.build_trunk(build_blocks(config, self.grid_size, range(config.num_hidden_layers)),
                         nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final_norm else None)
        self.post_init()

    def shared_attention_bias(self, grid_size: tuple[int, int]) -> torch.Tensor | None:
        """[1, H, 1+N, 1+N] the shared relative position bias, or None without one."""
        return None if self.rel_pos_bias is None else self.rel_pos_bias(grid_size).unsqueeze(0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BEiTModelOutput | tuple:
        """``bool_masked_pos`` [B, N] (True = masked) replaces those patches by the mask token."""
        grid = self.patch_embed.grid_size(pixel_values)
        mask = None
        if bool_masked_pos is not None:
            mask = check_bool_masked_pos(bool_masked_pos, pixel_values.shape[0], grid)  # [B, N]
        encoded = self.encode(  # [B, 1+N, D]
            pixel_values, mask=mask, block_args=(self.shared_attention_bias(grid), grid),
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        x = encoded.last_hidden_state
        output = BEiTModelOutput(last_hidden_state=x, hidden_states=encoded.hidden_states,
                                 pooler_output=pool_tokens(x, self.config.use_mean_pooling),
                                 attentions=encoded.attentions)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class BEiTForMaskedImageModeling(BEiTPreTrainedModel):
    """BEiT pre-training: the LM head predicts the visual token of every masked patch (only those).

    ``forward(pixel_values, bool_masked_pos, labels)``: labels are the token ids of ALL patches
    [B, N]; the model picks the masked ones. With ``use_cls_pretext_head`` (BEiT v2) the CLS head's
    loss is added 1:1 and reported separately.
    """

    def __init__(self, config: BEiTConfig):
        super().__init__(config)
        self.beit = BEiTModel(config)
        self.cls_pt_layers = self.cls_pt_norm = self.cls_pt_lm_head = None
        if config.use_cls_pretext_head:
            first = config.cls_head_early_layer
            depths = range(first, first + config.cls_head_depth)
            self.cls_pt_layers = use_torch_default_init(build_blocks(config, self.beit.grid_size, depths))
            if not config.shared_lm_head:  # the head's own final norm and LM head (reference init)
                self.cls_pt_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                self.cls_pt_lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward_cls_head(self, hidden_states: tuple[torch.Tensor, ...], grid: tuple[int, int]) -> torch.Tensor:
        """BEiT v2: early patch tokens + the last block's CLS (before the final norm) -> cls_pt_layers.
        hidden_states[k] is the output of the k-th block (hidden_states[0]: the embeddings)."""
        early_patches = hidden_states[self.config.cls_head_early_layer][:, 1:]  # [B, N, D]
        final_cls = hidden_states[-1][:, :1]  # [B, 1, D]
        x = torch.cat([final_cls, early_patches], dim=1)  # [B, 1+N, D]
        shared_bias = self.beit.shared_attention_bias(grid)
        for block in self.cls_pt_layers:
            x = block(x, shared_bias, grid)  # [B, 1+N, D]
        return x

    @staticmethod
    def predict_masked(tokens: torch.Tensor, masked: tuple[torch.Tensor, torch.Tensor], head: nn.Module,
                       norm: nn.Module | None = None) -> torch.Tensor:
        """tokens [B, 1+N, D] -> logits [M, V] of the masked patches; `masked`: their (sample, patch) indices."""
        samples, patches = masked
        selected = tokens[samples, patches + 1]  # [M, D] (+1: the CLS token comes first)
        return head(selected if norm is None else norm(selected))  # [M, V]

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BEiTForMaskedImageModelingOutput | tuple:
        grid = self.beit.patch_embed.grid_size(pixel_values)
        mask = required_mask(bool_masked_pos, pixel_values.shape[0], grid)  # [B, N]
        labels = None if labels is None else check_labels(labels, mask, grid, self.config.vocab_size)  # [B, N]
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        need_states = output_hidden_states or self.cls_pt_layers is not None
        encoded = self.beit(pixel_values, bool_masked_pos=mask, output_hidden_states=need_states,
                            output_attentions=output_attentions, return_dict=True)
        # The masked count M varies per batch (BEiT's blockwise masks), so it is read once, here, after the
        # encoder: the one data-dependent shape of the step (one graph break under torch.compile).
        masked = mask.nonzero(as_tuple=True)  # (sample, patch) indices [M] each, row-major
        targets = None if labels is None else labels[masked]  # [M]
        logits = self.predict_masked(encoded.last_hidden_state, masked, self.lm_head)  # [M, V], already normed
        cls_logits = None
        if self.cls_pt_layers is not None:
            shared = self.cls_pt_lm_head is None  # the encoder's norm and LM head, or the head's own
            head, norm = (self.lm_head, self.beit.norm) if shared else (self.cls_pt_lm_head, self.cls_pt_norm)
            cls_logits = self.predict_masked(self.forward_cls_head(encoded.hidden_states, grid), masked, head, norm)
        losses = {} if targets is None else self.head_losses(logits, cls_logits, targets, masked[0], mask.shape[0])
        output = BEiTForMaskedImageModelingOutput(  # built at once: the fields keep their order in tuples
            logits=logits, cls_head_logits=cls_logits,
            hidden_states=encoded.hidden_states if output_hidden_states else None, attentions=encoded.attentions,
            **losses,
        )
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    @staticmethod
    def head_losses(logits: torch.Tensor, cls_logits: torch.Tensor | None, targets: torch.Tensor,
                    samples: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
        """The loss fields of the output: logits [M, V] (and the v2 head's), targets [M], samples [M] (the
        sample of each masked patch). The head's loss is added 1:1."""
        mim = masked_token_losses(logits, targets, samples, batch)
        fields = {"loss": mim.loss, "mim_loss": mim.loss, "accuracy": mim.accuracy,
                  "per_sample_loss": mim.per_sample_loss, "per_sample_accuracy": mim.per_sample_accuracy}
        if cls_logits is not None:
            head = masked_token_losses(cls_logits, targets, samples, batch)
            fields.update(loss=mim.loss + head.loss, per_sample_loss=mim.per_sample_loss + head.per_sample_loss,
                          cls_head_loss=head.loss, cls_head_accuracy=head.accuracy,
                          cls_head_per_sample_loss=head.per_sample_loss,
                          cls_head_per_sample_accuracy=head.per_sample_accuracy)
        return fields


class BEiTForImageClassification(ImageClassificationMixin, BEiTPreTrainedModel):
    """BEiT fine-tuning: mean-pooled patch tokens -> ``fc_norm`` -> Linear (or the final-normed CLS
    token when ``use_mean_pooling=False``); see :class:`ImageClassificationMixin`. The mask token,
    LM head and v2 CLS head of a pre-training checkpoint are not used."""

    _keys_to_ignore_on_load_unexpected = [
        r"relative_position_index", r"^lm_head\.", r"^cls_pt_(layers|norm|lm_head)\.", r"(^|\.)mask_token$",
    ]

    def __init__(self, config: BEiTConfig):
        super().__init__(config)
        self.beit = BEiTModel(config, use_mask_token=False, use_final_norm=not config.use_mean_pooling)
        self.build_classification_head(config)
        self.post_init()


__all__ = [
    "BEiTForImageClassification", "BEiTForMaskedImageModeling", "BEiTModel", "BEiTPreTrainedModel",
    "expand_shared_relative_position_bias",
]
