"""Configuration of the VQ-KD tokenizer of BEiT v2 (vector-quantized knowledge distillation)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_vit import VitBackboneConfig, check_heads
from .quantizer import EmaVectorQuantizer
from .vit_core import grid_size_for

TEACHER_TYPES = ("clip", "auto")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@strict
class VqkdConfig(VitBackboneConfig):
    r"""VQ-KD (Peng et al., 2022): a ViT encoder whose patch tokens are quantized against an EMA codebook,
    and a small ViT decoder that predicts the features of a frozen teacher from the codes.

    Defaults are the published ``vqkd_encoder_base_decoder_3x768x12_clip``: encoder ViT-B/16 (768 x 12,
    12 heads, learned absolute positions, BEiT q/v biases, no layer scale, no relative bias, ``fc_norm``
    on every patch token); codebook 8192 x 32 (decay 0.99, k-means init); decoder 768 x 3 with 12 heads,
    patch size 1 over the 14 x 14 x 32 code map; teacher CLIP ViT-B/16 patch tokens after its final
    LayerNorm and visual projection (512 dims).

    The ``teacher_*`` fields are DATA only: the teacher is never part of the tokenizer (nor of its
    checkpoint) and is not needed to tokenize. ``hf_mim.teachers.load_teacher_for(config)`` loads it:
    ``teacher_name_or_path`` (model id or directory), ``teacher_type`` ("clip": a CLIP checkpoint, its
    projected patch tokens; "auto": any vision model loadable with AutoModel, CLIP detected),
    ``teacher_dim`` (size of the teacher features the decoder predicts), ``teacher_image_mean/std`` (the
    teacher's input normalisation when its checkpoint has no image processor config),
    ``teacher_layer`` (None: the final features; k: the raw patch tokens of ``hidden_states[k]``),
    ``teacher_input_size`` (None: the tokenizer's images as they are; else the teacher sees them resized
    to this size, e.g. 196 for a patch-14 teacher and a 14 x 14 token grid).

    Quantizer options (see ``quantizer.EmaVectorQuantizer``): ``decay``, ``kmeans_init``,
    ``kmeans_iters``, ``commitment_weight``, ``dead_code_restart`` (not in the reference; off by
    default), ``dead_code_threshold``, ``usage_warning_threshold``.

    Example:

    ```python
    >>> from hf_mim import VqkdConfig, VqkdTokenizer
    >>> tokenizer = VqkdTokenizer(VqkdConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3))
    ```
    """

    model_type = "hf_mim_vqkd"

    # encoder: the VitBackboneConfig fields (drop_path_rate: encoder only; the reference uses 0), and
    qkv_bias: bool = True  # BEiT layout: q_bias and v_bias, no key bias
    # codebook
    code_dim: int = 32
    num_codes: int = 8192
    decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    commitment_weight: float | int = 1.0
    dead_code_restart: bool = False
    dead_code_threshold: int = 100
    usage_warning_threshold: float | int = 0.5
    # decoder (patch size 1 over the code map)
    decoder_hidden_size: int = 768
    decoder_num_hidden_layers: int = 3
    decoder_num_attention_heads: int = 12
    decoder_intermediate_size: int = 3072
    # teacher (data only)
    teacher_name_or_path: str | None = "openai/clip-vit-base-patch16"
    teacher_type: str = "clip"
    teacher_dim: int = 512
    teacher_image_mean: list[float] | tuple[float, ...] = CLIP_MEAN
    teacher_image_std: list[float] | tuple[float, ...] = CLIP_STD
    teacher_layer: int | None = None
    teacher_input_size: int | list[int] | tuple[int, int] | None = None

    @property
    def vocab_size(self) -> int:
        return self.num_codes

    def validate_architecture(self):
        super().validate_architecture()
        check_heads(self.decoder_hidden_size, self.decoder_num_attention_heads, "decoder_")
        EmaVectorQuantizer.check_settings(
            self.num_codes, self.code_dim, self.decay, self.kmeans_iters, self.commitment_weight,
            self.dead_code_threshold, self.usage_warning_threshold,
        )
        self.validate_teacher()

    def validate_teacher(self) -> None:
        if self.teacher_type not in TEACHER_TYPES:
            raise ValueError(
                f"teacher_type must be one of {TEACHER_TYPES}, got {self.teacher_type!r}: 'clip' for a CLIP checkpoint "
                "(projected patch tokens), 'auto' for any vision model loadable with AutoModel (ViT, DINO, hf_mim MAE)."
            )
        if self.teacher_dim < 1:
            raise ValueError(
                f"teacher_dim must be at least 1, got {self.teacher_dim} (CLIP ViT-B/16: 512, DINO ViT-B: 768)."
            )
        for name in ("teacher_image_mean", "teacher_image_std"):
            values = getattr(self, name)
            if len(values) != self.num_channels:
                raise ValueError(f"{name} has {len(values)} values, expected one per channel ({self.num_channels}).")
        if min(self.teacher_image_std) <= 0:
            raise ValueError(f"teacher_image_std must be positive, got {list(self.teacher_image_std)}.")
        if self.teacher_input_size is not None:
            grid_size_for(self.teacher_input_size, 1)  # a positive int or (height, width) pair


# Named architectures (`--config_name vqkd-base`).
PRESETS = {
    # 32 px digits, 4 px patches -> 8x8 tokens (the grid of the MAE demo of examples/pretrain.py), 64 codes.
    "vqkd-demo": dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, decoder_hidden_size=64, decoder_num_hidden_layers=1,
                      decoder_num_attention_heads=2, decoder_intermediate_size=128, code_dim=16, num_codes=64,
                      teacher_name_or_path=None, teacher_type="auto"),
    "vqkd-base": {},  # vqkd_encoder_base_decoder_3x768x12_clip: ViT-B/16, 8192 x 32 codes, CLIP ViT-B/16 teacher
}


__all__ = ["VqkdConfig"]
