"""Configuration of the DALL-E discrete VAE, the image tokenizer of BEiT v1."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

RECONSTRUCTION_LOSSES = ("logit_laplace", "mse")
ANNEAL_SCHEDULES = ("cosine", "linear")


@strict
class DvaeConfig(PreTrainedConfig):
    r"""The DALL-E dVAE (Ramesh et al., 2021): a convolutional encoder giving `vocab_size` logits per
    cell of an 8x-downsampled grid, and a decoder from (soft) one-hot codes back to pixels.

    Defaults are the published tokenizer that BEiT v1 uses (vocab 8192, first width 256, four groups
    of two blocks; decoder first width 128, then 2048 ... 256) and the paper's training settings.
    Field names of the encoder follow transformers' ``FlavaImageCodebookConfig``.

    Encoder: ``hidden_size`` is the first width; group g (0-based) has width ``hidden_size * 2**g``,
    a 2x max-pool follows every group but the last, so the grid is ``image / 2**(num_groups - 1)``.
    Decoder: mirror image (widths ``decoder_hidden_size * 2**(num_groups-1)`` down to
    ``decoder_hidden_size``, nearest 2x upsampling), preceded by a 1x1 conv from the codes to
    ``decoder_init_size`` and ending in a 1x1 conv to ``2 * input_channels`` maps: the location and the
    log-scale of a logit-Laplace distribution per pixel value.

    ``reference_fp16``: compute every convolution except the encoder's last and the decoder's first in
    fp16, as the published code does on CUDA (BEiT's targets come from that). Near-tie argmaxes differ
    from fp32 on a small fraction of cells. On CPU the fp16 rounding is emulated (see
    ``modeling_dvae.conv2d_fp16``). ``False`` computes in the weights' dtype (the reference on CPU,
    and ``FlavaImageCodebook``); train with ``False``.

    Training (Gumbel-softmax relaxation, uniform prior): the temperature is annealed from
    ``temperature_start`` to ``temperature_end`` over ``temperature_anneal_steps`` updates and the KL
    weight rises from 0 to ``kl_weight`` over ``kl_warmup_steps`` (paper: 1 -> 1/16 over 150,000;
    0 -> 6.6 over 5,000; cosine). ``straight_through`` feeds the decoder hard one-hot codes with the
    relaxed gradient. ``reconstruction_loss``: "logit_laplace" (the paper's likelihood) or "mse".

    Example:

    ```python
    >>> from hf_mim import DvaeConfig, DvaeTokenizer
    >>> tokenizer = DvaeTokenizer(DvaeConfig(hidden_size=64, vocab_size=512, decoder_hidden_size=64))
    ```
    """

    model_type = "hf_mim_dvae"

    vocab_size: int = 8192
    hidden_size: int = 256
    num_groups: int = 4
    num_blocks_per_group: int = 2
    input_channels: int = 3
    with_decoder: bool = True
    decoder_init_size: int = 128
    decoder_hidden_size: int = 256
    decoder_num_blocks_per_group: int = 2
    reference_fp16: bool = True
    logit_laplace_eps: float = 0.1
    reconstruction_loss: str = "logit_laplace"
    kl_weight: float | int = 6.6
    kl_warmup_steps: int = 5000
    temperature_start: float | int = 1.0
    temperature_end: float | int = 1.0 / 16
    temperature_anneal_steps: int = 150000
    anneal_schedule: str = "cosine"
    straight_through: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_groups - 1)

    def validate_architecture(self):
        super().validate_architecture()
        for name in ("vocab_size", "num_groups", "num_blocks_per_group", "input_channels",
                     "decoder_init_size", "decoder_num_blocks_per_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("hidden_size", "decoder_hidden_size"):
            width = getattr(self, name)
            if width < 4 or width % 4:
                raise ValueError(f"{name}={width} must be a positive multiple of 4 (blocks work at width / 4).")
        if not 0.0 < self.logit_laplace_eps < 0.5:
            raise ValueError(f"logit_laplace_eps must be in (0, 0.5), got {self.logit_laplace_eps}.")
        for name, allowed in (("reconstruction_loss", RECONSTRUCTION_LOSSES), ("anneal_schedule", ANNEAL_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if not 0.0 < self.temperature_end <= self.temperature_start:
            raise ValueError(f"Need 0 < temperature_end <= temperature_start, got {self.temperature_end} "
                             f"and {self.temperature_start}.")
        if self.kl_weight < 0 or self.kl_warmup_steps < 0 or self.temperature_anneal_steps < 0:
            raise ValueError("kl_weight, kl_warmup_steps and temperature_anneal_steps must not be negative.")


# Named architectures (`--config_name dvae-base`).
PRESETS = {
    # 32 px digits -> 8x8 tokens, 64 codes; the paper's schedules (temperature 1 -> 1/16 over 150,000 updates,
    # KL weight 0 -> 6.6 over 5,000) shortened 1000x to the demo's ~230 steps. A lower KL weight collapses
    # the codebook (1.0: 13 of 64 codes in use after the demo, perplexity 4.5; 6.6: 53, perplexity 28.9).
    "dvae-demo": dict(vocab_size=64, hidden_size=32, num_groups=3, num_blocks_per_group=1, decoder_init_size=32,
                      decoder_hidden_size=32, decoder_num_blocks_per_group=1, reference_fp16=False,
                      temperature_anneal_steps=150, kl_warmup_steps=5),
    "dvae-base": dict(reference_fp16=False),  # the published architecture, trained in fp32 / mixed precision
}


__all__ = ["DvaeConfig"]
