"""A saved MAE checkpoint loads with `trust_remote_code=True` where hf_mim cannot be imported, and
the code shipped with it computes what the installed package computes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import torch
from mae_testing import perturb_parameters_, tiny_mae_config

from hf_mim import MaeForImageClassification, MaeForPreTraining

# Runs in a fresh interpreter, outside the repository, with `import hf_mim` made impossible.
LOAD_WITHOUT_HF_MIM = textwrap.dedent("""
    import sys
    sys.modules["hf_mim"] = None  # any `import hf_mim` now raises ImportError
    import torch
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    checkpoint, inputs_path, outputs_path = sys.argv[1:]
    inputs = torch.load(inputs_path)
    pixels, noise = inputs["pixels"], inputs["noise"]
    outputs = {}
    with torch.no_grad():
        model = AutoModelForPreTraining.from_pretrained(checkpoint, trust_remote_code=True).eval()
        outputs["pretraining_class"] = type(model).__module__ + "." + type(model).__name__
        result = model(pixels, noise=noise)
        outputs["logits"], outputs["loss"] = result.logits, result.loss
        model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
        outputs["base_class"] = type(model).__module__ + "." + type(model).__name__
        outputs["features"] = model(pixels).last_hidden_state
        model = AutoModelForImageClassification.from_pretrained(checkpoint, trust_remote_code=True, num_labels=3)
        model.eval()
        outputs["classifier_class"] = type(model).__module__ + "." + type(model).__name__
        outputs["classifier_state"] = model.state_dict()
        outputs["class_logits"] = model(pixels).logits
    outputs["hf_mim_imported"] = any(name.startswith("hf_mim.") for name in sys.modules)
    torch.save(outputs, outputs_path)
""")


def test_remote_code_without_hf_mim(tmp_path):
    torch.manual_seed(0)
    model = perturb_parameters_(MaeForPreTraining(tiny_mae_config())).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)

    # The folder is flat, and no shipped file imports the package.
    assert all(entry.is_file() for entry in checkpoint.iterdir())
    shipped = sorted(p.name for p in checkpoint.glob("*.py"))
    assert {"configuration_mae.py", "modeling_mae.py", "vit_core.py"} <= set(shipped)
    for path in checkpoint.glob("*.py"):
        assert not re.search(r"^\s*(?:from|import)\s+hf_mim\b", path.read_text(), re.MULTILINE), path.name

    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.save({"pixels": pixels, "noise": noise}, tmp_path / "inputs.pt")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    script = workdir / "load.py"
    script.write_text(LOAD_WITHOUT_HF_MIM)
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "outputs.pt")

    assert not remote["hf_mim_imported"]
    for key, name in [("pretraining_class", "MaeForPreTraining"), ("base_class", "MaeModel"),
                      ("classifier_class", "MaeForImageClassification")]:
        assert remote[key].startswith("transformers_modules.") and remote[key].endswith("." + name), remote[key]
    with torch.no_grad():
        expected = model(pixels, noise=noise)
        torch.testing.assert_close(remote["logits"], expected.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(remote["loss"], expected.loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(remote["features"], model.encoder(pixels).last_hidden_state, atol=1e-6, rtol=0)
        # The classifier: the same encoder weights, and the same computation for the same weights.
        classifier = MaeForImageClassification.from_pretrained(checkpoint, num_labels=3)
        classifier.load_state_dict(remote["classifier_state"])
        assert torch.equal(classifier.encoder.blocks[1].mlp.fc2.weight, model.encoder.blocks[1].mlp.fc2.weight)
        torch.testing.assert_close(remote["class_logits"], classifier.eval()(pixels).logits, atol=1e-6, rtol=0)
