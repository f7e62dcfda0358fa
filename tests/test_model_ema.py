"""Model EMA in fine-tuning (`--model_ema`, `hf_mim.finetuning.ema`): the average PyTorch's
`AveragedModel` keeps through a real Trainer run, what `finetune.py` saves, evaluates and records
with it, resuming it from a checkpoint, and the errors of bad settings.

Tiny models on the CPU with one thread, as in test_finetune.py (whose digits helpers are reused).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_finetune import ENCODER, PER_BLOCK, digits_files, finetune_args, mae_checkpoint, top1_of_saved_model
from transformers import TrainerCallback, TrainingArguments

from hf_mim import BEiTConfig, BEiTForImageClassification
from hf_mim.finetuning import FinetuningTrainer, ModelEmaCallback, run
from hf_mim.finetuning.arguments import parse_finetuning_args
from hf_mim.finetuning.ema import EMA_WEIGHTS_NAME, build_ema, check_ema_compatible
from hf_mim.finetuning.transforms import ClassificationCollator

__all__ = ["digits_files", "mae_checkpoint"]  # fixtures from test_finetune, used by name below

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DECAY = 0.6  # far from 1, so three steps of averaging differ clearly from the last weights


# ---------------------------------------------------------------------------------------------
# The average, through a real FinetuningTrainer run
# ---------------------------------------------------------------------------------------------

class RecordWeights(TrainerCallback):
    """Every tensor of the model after each optimizer step: what the EMA should have averaged."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(tensors(model))


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and all buffers (BEiT's integer `relative_position_index` is not in the state dict)."""
    return {name: tensor.detach().clone() for name, tensor in [*model.named_parameters(), *model.named_buffers()]}


def expected_ema(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """ema_1 = w_1, then ema = d * ema + (1 - d) * w; integer tensors are copied, never averaged."""
    ema = dict(steps[0])
    for weights in steps[1:]:
        ema = {name: decay * ema[name] + (1 - decay) * w if w.is_floating_point() else w
               for name, w in weights.items()}
    return ema


def tiny_beit() -> BEiTForImageClassification:
    torch.manual_seed(0)
    return BEiTForImageClassification(BEiTConfig(**ENCODER, **PER_BLOCK, num_labels=3))


def random_examples(count: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": index % 3}
            for index in range(count)]


def test_ema_follows_the_formula_once_per_optimizer_step(tmp_path):
    model, record, ema = tiny_beit(), RecordWeights(), ModelEmaCallback(DECAY)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="no", dataloader_num_workers=0, seed=0,
        disable_tqdm=True)
    trainer = FinetuningTrainer(model=model, args=args, train_dataset=random_examples(),
                                data_collator=ClassificationCollator(3), callbacks=[record, ema])
    trainer.train()

    # One update per optimizer step (3), not per micro-batch (6).
    assert len(record.steps) == 3 and int(ema.ema.n_averaged) == 3
    expected, averaged = expected_ema(record.steps, DECAY), tensors(ema.ema.module)
    assert set(averaged) == set(expected)
    for name in expected:
        torch.testing.assert_close(averaged[name], expected[name], msg=name)
    indices = [name for name in expected if name.endswith("relative_position_index")]
    assert indices and all(torch.equal(averaged[name], record.steps[0][name]) for name in indices)
    # Not trivially the last weights, and not in the optimizer.
    assert not torch.allclose(averaged["head.weight"], record.steps[-1]["head.weight"], atol=1e-4)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in ema.ema.parameters()}
    # Training ended: the model holds the EMA weights, so evaluate() / save_model() use them.
    final = tensors(model)
    for name in expected:
        torch.testing.assert_close(final[name], averaged[name], rtol=0, atol=0, msg=name)


def test_integer_buffers_are_copied_not_averaged():
    """PyTorch's EMA function alone computes an int buffer in float and truncates (47.99.. -> 47)."""
    module = torch.nn.Linear(2, 2)
    module.register_buffer("index", torch.arange(200))
    ema = build_ema(module, 0.9999)
    for _ in range(3):
        ema.update_parameters(module)
    assert torch.equal(ema.module.index, module.index)


# ---------------------------------------------------------------------------------------------
# finetune.py --model_ema: saved, evaluated, recorded, resumed
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def ema_callbacks(monkeypatch) -> list[ModelEmaCallback]:
    """The EMA callbacks run.main builds, in order."""
    made = []

    class Recorded(ModelEmaCallback):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(run, "ModelEmaCallback", Recorded)
    return made


EMA_RUN = ("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "5e-3",
           "--model_ema", "--model_ema_decay", "0.9", "--drop_path", "0", "--aa", "none", "--reprob", "0")


def test_finetune_saves_evaluates_and_resumes_the_ema(digits_files, mae_checkpoint, tmp_path, ema_callbacks):
    first = tmp_path / "first"
    metrics = run.main(finetune_args(digits_files, mae_checkpoint, first, *EMA_RUN))
    callback = ema_callbacks[0]
    saved = load_file(first / "model.safetensors")
    averaged = callback.ema.module.state_dict()
    assert set(saved) == set(averaged)
    for key in saved:
        torch.testing.assert_close(saved[key], averaged[key], rtol=0, atol=0, msg=key)
    raw = load_file(first / "checkpoint-4" / "model.safetensors")  # the raw weights after the last step
    assert not torch.allclose(raw["head.weight"], saved["head.weight"], atol=1e-4)
    # The final evaluation measured the saved (EMA) model; the card records the decay.
    assert metrics["eval_top1"] == pytest.approx(top1_of_saved_model(first, digits_files["validation"]), abs=1e-6)
    assert "| `model_ema_decay` | `0.9` |" in ModelCard.load(first / "README.md").text
    # Each checkpoint holds the average as it was then.
    for step in (2, 4):
        checkpoint_ema = load_file(first / f"checkpoint-{step}" / EMA_WEIGHTS_NAME)
        assert int(checkpoint_ema["n_averaged"]) == step
    torch.testing.assert_close(load_file(first / "checkpoint-4" / EMA_WEIGHTS_NAME)["module.head.weight"],
                               saved["head.weight"], rtol=0, atol=0)

    # Resumed from step 2, the run ends with the same average (a restarted one would have 2 updates).
    resumed = tmp_path / "resumed"
    run.main(finetune_args(digits_files, mae_checkpoint, resumed, *EMA_RUN,
                           "--resume_from_checkpoint", str(first / "checkpoint-2")))
    assert int(ema_callbacks[1].ema.n_averaged) == 4
    again = load_file(resumed / "model.safetensors")
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], msg=key)


# ---------------------------------------------------------------------------------------------
# Bad settings: clear errors that name the fix, before any training
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["0", "1", "1.5", "-0.1"])
def test_decay_outside_zero_one_is_clear(decay):
    with pytest.raises(ValueError, match=rf"--model_ema_decay {float(decay)} must be strictly between 0 and 1"):
        parse_finetuning_args(["--model_ema", "--model_ema_decay", decay, "--output_dir", "x"])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ModelEmaCallback(float(decay))


def test_decay_without_model_ema_warns():
    with pytest.warns(UserWarning, match="--model_ema_decay does nothing without --model_ema"):
        _, _, finetuning, _ = parse_finetuning_args(["--model_ema_decay", "0.99", "--output_dir", "x"])
    assert not finetuning.model_ema
    _, _, finetuning, _ = parse_finetuning_args(["--model_ema", "--output_dir", "x"])
    assert finetuning.model_ema and finetuning.model_ema_decay == 0.9999  # timm's default


def test_model_ema_with_load_best_model_at_end_is_clear(digits_files, mae_checkpoint, tmp_path):
    args = finetune_args(digits_files, mae_checkpoint, tmp_path / "out", "--max_steps", "1", "--model_ema",
                         "--load_best_model_at_end", "--eval_strategy", "steps", "--save_strategy", "steps")
    with pytest.raises(ValueError, match="--model_ema with --load_best_model_at_end.*Drop one"):
        run.main(args)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("setting", ["fsdp", "deepspeed", "accelerate_fsdp"])
def test_model_ema_with_sharded_weights_is_clear(setting, monkeypatch):
    """Sharded weights (FSDP / DeepSpeed, from the flags or an `accelerate launch` config) would be
    averaged as the shards' empty placeholders."""
    training = SimpleNamespace(load_best_model_at_end=False, fsdp="full_shard" if setting == "fsdp" else "",
                               deepspeed="ds.json" if setting == "deepspeed" else None)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    if setting == "accelerate_fsdp":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="--model_ema needs the full weights.*use DDP"):
        check_ema_compatible(training)
