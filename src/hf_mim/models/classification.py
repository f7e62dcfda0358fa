"""The image-classification head that every hf_mim encoder shares (the MAE / BEiT fine-tuning recipe).

Its parameters keep the reference names, ``fc_norm`` and ``head``, at the top of the model, so
fine-tuned reference checkpoints load by identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

# The reference fine-tuning code initialises the head with std 0.02 * init_scale 0.001: a near-zero
# head keeps the first steps from wrecking the pre-trained features.
HEAD_INIT_STD = 2e-5


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [B, K] against class ids [B] or soft targets [B, K] (mixup / cutmix,
    label smoothing), computed in float32."""
    return F.cross_entropy(logits.float(), labels if labels.is_floating_point() else labels.long())


def pool_tokens(hidden_states: torch.Tensor, use_mean_pooling: bool) -> torch.Tensor:
    """[B, 1+N, D] (CLS first) -> [B, D]: the mean of the patch tokens (the MAE / BEiT fine-tuning
    pooling, before its ``fc_norm``) or the CLS token. Every encoder returns it as ``pooler_output``."""
    return hidden_states[:, 1:].mean(dim=1) if use_mean_pooling else hidden_states[:, 0]


# What transformers' Trainer may pass to a model whose forward takes **kwargs; anything else is a typo.
TRAINER_LOSS_KWARGS = frozenset({"num_items_in_batch"})


def check_loss_kwargs(model_name: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - TRAINER_LOSS_KWARGS)
    if unknown:
        raise TypeError(f"{model_name}.forward() got unexpected keyword arguments {unknown}; it takes pixel_values, "
                        "labels, output_hidden_states, output_attentions and return_dict.")


class ImageClassificationMixin:
    """For ``*ForImageClassification`` models: with ``config.use_mean_pooling`` the patch tokens are
    averaged and normalised by ``fc_norm`` (the encoder is then built without its final norm, whose
    weights a pre-training checkpoint reports unused, as in the reference); without it the
    encoder's final-normed CLS token is classified (the ViT paper).

    A model builds its encoder under its ``base_model_prefix`` and calls
    :meth:`build_classification_head` in ``__init__``; ``forward`` and the head's init are here.
    """

    # The loss is a batch mean that ignores `num_items_in_batch`: without this, transformers' Trainer would read
    # the forward's **kwargs as "normalises by num_items_in_batch" and skip its gradient-accumulation scaling.
    accepts_loss_kwargs = False

    def build_classification_head(self, config) -> None:
        self.num_labels = config.num_labels
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.use_mean_pooling else None
        self.head = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # the family's init, then the reference head init
        if module is getattr(self, "head", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=HEAD_INIT_STD)
            init.zeros_(module.bias)

    def pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, 1+N, D] (CLS first) -> [B, D]."""
        pooled = pool_tokens(hidden_states, use_mean_pooling=self.fc_norm is not None)  # [B, D]
        return pooled if self.fc_norm is None else self.fc_norm(pooled)  # CLS: already final-normed

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """`labels`: class ids [B], or soft targets [B, num_labels] (mixup / cutmix). Other keywords are
        the Trainer's loss keywords (`num_items_in_batch`), accepted and unused: the loss is a batch mean
        (`accepts_loss_kwargs = False` tells the Trainer so, which then scales it for gradient accumulation)."""
        check_loss_kwargs(type(self).__name__, kwargs)
        encoded = self.base_model(pixel_values, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions, return_dict=True)
        logits = self.head(self.pool(encoded.last_hidden_state))  # [B, num_labels]
        loss = None if labels is None else classification_loss(logits, labels)
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states,
                                       attentions=encoded.attentions)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


__all__ = ["HEAD_INIT_STD", "ImageClassificationMixin", "classification_loss", "pool_tokens"]
