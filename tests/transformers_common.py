"""transformers' own common model tests, run against hf_mim: the fetcher and the adapter.

`common_test_modules()` fetches the source distribution of the INSTALLED transformers from the package
registry (`pip download --no-binary :all: --no-deps transformers==<version>`, once, into `.ci/cache/`,
or `$HF_MIM_TRANSFORMERS_TESTS`), unpacks its `tests/test_modeling_common.py` and
`tests/test_backbone_common.py` there as the package `transformers_tests`, and imports them. Nothing of
theirs is copied into this repository. `FamilyModelTester` is the "model tester" those mixins ask for:
a tiny config of one hf_mim family and its inputs.

`DELIBERATE_DIFFERENCES` lists every common test that hf_mim does not run, with the reason.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import transformers

from hf_mim.models.encoder import VitEncoderMixin
from hf_mim.registry import model_families

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HF_MIM_TRANSFORMERS_TESTS", REPO / ".ci" / "cache"))
PACKAGE = "transformers_tests"
COMMON_FILES = ("test_modeling_common.py", "test_backbone_common.py")

# test_modeling_common.py imports two mixins from folders the source distribution does not ship (tests/exporters,
# tests/generation): they test torch.export and text generation, not part of this run (see DELIBERATE_DIFFERENCES).
ABSENT_MIXINS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def fetch_common_tests(version: str = transformers.__version__) -> Path:
    """The folder holding the package `transformers_tests` of transformers `version` (fetched once)."""
    root = CACHE / f"transformers-{version}"
    package = root / PACKAGE
    if (package / "COMPLETE").exists():
        return root
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
             f"transformers=={version}", "-d", download],
            check=True, timeout=900,
        )
        archive = next(Path(download).glob("transformers-*.tar.gz"))
        with tarfile.open(archive) as sdist:
            for name in COMMON_FILES:
                member = sdist.extractfile(f"transformers-{version}/tests/{name}")
                (package / name).parent.mkdir(parents=True, exist_ok=True)
                (package / name).write_bytes(member.read())
    for path, source in ABSENT_MIXINS.items():
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(source)
    for folder in {package, *((package / path).parent for path in ABSENT_MIXINS)}:
        (folder / "__init__.py").touch()
    (package / "COMPLETE").write_text(f"transformers {version}: {', '.join(COMMON_FILES)}\n")
    return root


def common_test_modules():
    """(test_modeling_common, test_backbone_common) of the installed transformers."""
    root = str(fetch_common_tests())
    if root not in sys.path:
        sys.path.insert(0, root)
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_backbone_common"))


def forward_parameters(model_class) -> set[str]:
    return set(inspect.signature(model_class.forward).parameters)


def tiny_decoder(config_class) -> dict:
    """MAE's decoder at the encoder's tiny size (transformers' tests refuse models over 1M parameters)."""
    if not hasattr(config_class, "decoder_hidden_size"):
        return {}
    return {"decoder_hidden_size": 16, "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2,
            "decoder_intermediate_size": 32}


class FamilyModelTester:
    """A tiny model of one family for one head: 2 layers, 2 heads, width 32, 16x16 images of 4x4 patches."""

    batch_size = 2
    num_hidden_layers = 2
    num_attention_heads = 2
    hidden_size = 32
    image_size = 16
    patch_size = 4
    num_channels = 3

    def __init__(self, parent, config_class, model_class, extra_config: dict | None = None):
        self.parent = parent
        self.config_class = config_class
        self.model_class = model_class
        self.extra_config = extra_config or {}
        num_patches = (self.image_size // self.patch_size) ** 2
        self.num_patches = num_patches
        # MAE pre-training drops the masked patches from the encoder's sequence (the reference's shape).
        kept = num_patches - int(num_patches * self.get_config().mask_ratio) if self.drops_patches else num_patches
        self.seq_length = 1 + kept  # the encoder's too (transformers' testers fall back on seq_length)
        # the eager-vs-sdpa test masks the first `num_masks` of `mask_length` patches
        self.num_masks, self.mask_length = num_patches // 4, num_patches
        # the bare encoder has no loss to train (transformers skips its own base models by name)
        self.is_training = not issubclass(model_class, VitEncoderMixin)

    @property
    def drops_patches(self) -> bool:
        """A head that always masks by dropping patches (MAE pre-training): its sequence is shorter."""
        return "noise" in forward_parameters(self.model_class) and not issubclass(self.model_class, VitEncoderMixin)

    def get_config(self):
        return self.config_class(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=64, num_labels=3,
            **tiny_decoder(self.config_class), **self.extra_config,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = torch.rand(self.batch_size, self.num_channels, self.image_size, self.image_size)
        return self.get_config(), {"pixel_values": pixel_values}


HEADS = ("AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification")


# The families of `model_families()` that transformers' mixins and the model contract do not run, and why.
FAMILIES_NOT_RUN = {
    "hf_mim_dvae": "a visual tokenizer (DALL-E dVAE): a convolutional encoder/decoder without attention or hidden "
                   "states; its forward returns codes (tests/test_dvae.py)",
    "hf_mim_vqkd": "a visual tokenizer (VQ-KD): its forward needs the teacher's features and returns codes and losses, "
                   "not a transformers encoder output (tests/test_vqkd.py; its ViTs are the shared encoder)",
    "hf_mim_peco": "a visual tokenizer (PeCo VQ-VAE): convolutional, returns codes (tests/test_peco.py)",
}


def encoder_families() -> dict[type, dict[str, type]]:
    """config class -> heads, for the families built on the shared ViT encoder (the others are in
    FAMILIES_NOT_RUN)."""
    return {config: heads for config, heads in model_families().items()
            if issubclass(heads.get("AutoModel", object), VitEncoderMixin)}


def deterministic_config(config_class) -> dict:
    """Config values that make a head deterministic, as transformers' own ViT-MAE tests pass `noise`:
    ViT-MPP's corruption replaces every selected patch by the mask token (no random branch)."""
    return {"replace_prob": 1.0, "random_prob": 0.0} if hasattr(config_class, "replace_prob") else {}


def head_inputs(model_class, tester: FamilyModelTester, inputs: dict, return_labels: bool) -> dict:
    """The inputs a head needs beyond pixel_values (sized by the batch in `inputs`, which some common tests
    enlarge), fixed per call so that two calls agree; what a common test passes itself is kept."""
    batch = inputs["pixel_values"].shape[0]
    added = {}
    generator = torch.Generator().manual_seed(0)
    if tester.drops_patches:  # MAE: which patches are dropped comes from `noise`, as in transformers' ViT-MAE tests
        added["noise"] = torch.rand(batch, tester.num_patches, generator=generator)
    parameters = forward_parameters(model_class)
    if "bool_masked_pos" in parameters and not tester.drops_patches and "labels" in parameters:
        mask = torch.zeros(batch, tester.num_patches, dtype=torch.bool)
        mask[:, ::3] = True  # the same patches in every sample
        added["bool_masked_pos"] = mask
    if return_labels and "labels" in parameters:
        if "ImageClassification" in model_class.__name__:
            added["labels"] = torch.zeros(batch, dtype=torch.long)
        else:  # the class of every patch (visual token / mean colour)
            added["labels"] = torch.zeros(batch, tester.num_patches, dtype=torch.long)
    return {key: value for key, value in added.items() if key not in inputs}


# What hf_mim does not run of transformers' common tests (a test name, or a pattern of parametrized names) and why.
# Every test that runs passes: nothing here hides a failure. Not listed because not in the source distribution:
# ExportTesterMixin (torch.export; hf_mim's own export tests are in tests/test_export.py) and GenerationTesterMixin.
DELIBERATE_DIFFERENCES = {
    "test_bc_torch_dtype": "loads a saved model under every spelling of `dtype`: transformers' from_pretrained "
                           "code, which hf_mim does not override (the slowest common test: 3-10 s per head); "
                           "hf_mim's own save / load round trips in float32 and bfloat16 are in tests/test_mae.py",
    r"test_eager_matches_sdpa_inference_\d+_(fp16|bf16)_.*": "the half-precision variants of the eager-vs-sdpa "
                           "comparison; CI has no GPU, and the fp32 variants (and the output_attentions one) run the "
                           "same comparison on CPU",
}


def deliberately_skipped(test_name: str) -> str | None:
    """The reason `test_name` is not run, or None."""
    return next((reason for pattern, reason in DELIBERATE_DIFFERENCES.items() if re.fullmatch(pattern, test_name)),
                None)
