"""The dVAE demo must not collapse its codebook (issue 11): the `dvae-demo` preset keeps the DALL-E
paper's KL weight (6.6, reached after a short warm-up) and its temperature annealing (1 -> 1/16),
shortened in proportion to the demo's length.

Measured with the same 60-update run as below (seeds 0-2, 256 held-out digits): the preset uses
26-40 of the 64 codes (perplexity 9.8-13.5); the former demo settings (KL weight 1.0 over a 50-step
warm-up) 4-14 codes (perplexity 2.5-3.0), the collapse the full demo showed (13 of 64 codes).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from hf_mim.data import load_digits_dataset
from hf_mim.models import DvaeConfig, DvaeTokenizer
from hf_mim.models.presets import from_preset

pytestmark = pytest.mark.usefixtures("single_torch_thread")
STEPS, BATCH, LEARNING_RATE = 60, 32, 1e-3  # the demo's lr (blr 4e-3 x 64 / 256); a quarter of its updates


def code_usage(codes: torch.Tensor, num_codes: int) -> tuple[int, float]:
    """(codes used, perplexity = exp(entropy) of the code histogram) of token ids [any shape]."""
    counts = torch.bincount(codes.flatten(), minlength=num_codes).float()  # [K]
    probs = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), float(torch.exp(-(probs * probs.log()).sum()))


def test_dvae_demo_preset_keeps_the_codebook_in_use_after_a_short_run():
    config = from_preset("dvae-demo")
    assert isinstance(config, DvaeConfig)
    assert config.kl_weight == 6.6 and config.temperature_end == 1 / 16  # the paper's values, not shrunk
    images = load_digits_dataset()["image"]  # the demo data: 32 px digits
    pixels = torch.stack([pil_to_tensor(image).float() / 255 for image in images])  # [1797, 3, 32, 32] in [0, 1]
    train, held_out = pixels[:1500], pixels[1500:1756]

    torch.manual_seed(0)
    model = DvaeTokenizer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-4)
    order = torch.randint(0, len(train), (STEPS, BATCH), generator=torch.Generator().manual_seed(0))
    for step, batch in enumerate(order):  # what DvaeMethod does: the schedules follow the update count
        loss = model(pixel_values=train[batch], step=step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        codes = model.eval().get_codebook_indices(held_out)  # [256, 8, 8] argmax tokens, as BEiT reads them
    used, perplexity = code_usage(codes, config.vocab_size)
    assert used >= 20 and perplexity >= 6.0, f"collapsed: {used} of 64 codes, perplexity {perplexity:.1f}"
