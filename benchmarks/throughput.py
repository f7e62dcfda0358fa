"""Training throughput of hf_mim models against their transformers peers, in one process.

One training step = forward + backward + ``torch.optim.AdamW`` step (fused), on synthetic
batches already on the device; bf16 autocast and TF32 on CUDA. Both models of a pair run in the
same process on the same inputs, in alternating order (ours, peer, peer, ours, ...) so that drift
of a shared machine hits both alike; each timed block is ``warmup`` untimed steps then ``steps``
steps between two synchronisations, and the median over ``repeats`` blocks is reported.

    python benchmarks/throughput.py                      # preset chosen by device
    python benchmarks/throughput.py --preset vit-b16 --json results.json

Pairs live in ``PAIRS`` (name -> builder of a :class:`Pair`); adding a comparison is one small
builder function. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from hf_mim.launch import set_tf32


@dataclass(frozen=True)
class Preset:
    """Model shape and timing schedule. Field names follow ViTMAEConfig."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    decoder_hidden_size: int
    decoder_num_hidden_layers: int
    decoder_num_attention_heads: int
    decoder_intermediate_size: int
    batch_size: int
    warmup: int
    steps: int
    repeats: int
    bf16: bool  # bf16 autocast; applied on CUDA only


PRESETS = {
    # The published ViT-B/16 MAE and the method of shared/reference/PEER_BASELINES.md.
    "vit-b16": Preset(224, 16, 768, 12, 12, 3072, 512, 8, 16, 2048, batch_size=256, warmup=5, steps=20,
                      repeats=3, bf16=True),
    # Small enough for a loaded 2-core CPU; measures the Python and kernel-launch side, not matmuls.
    # Short blocks, many repeats: on a shared CPU the median of many short blocks drifts least.
    "cpu-tiny": Preset(64, 8, 192, 4, 3, 768, 128, 2, 4, 512, batch_size=16, warmup=1, steps=5,
                       repeats=7, bf16=False),
}


@dataclass
class Pair:
    """One comparison: our model and its peer doing the same work on the same batches.

    ``make_batch(generator)`` returns the inputs already on the device; ``loss_fn(model, batch)``
    runs one forward and returns the scalar loss (each side may need its own call, e.g. BEiT in
    transformers wants ``labels`` restricted to the masked positions). ``peer`` may be None when no
    transformers model exists (then only ours is timed). ``train=False`` times a no-grad forward
    without an optimizer (e.g. the BEiT v2 tokenizer, timed separately from the MIM step).
    """

    ours: nn.Module
    peer: nn.Module | None
    make_batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    ours_loss: Callable[[nn.Module, dict], torch.Tensor]
    peer_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None  # defaults to ours_loss
    train: bool = True


def output_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def build_mae_pair(preset: Preset, device: torch.device) -> Pair:
    """hf_mim MaeForPreTraining vs transformers ViTMAEForPreTraining (sdpa, mask 0.75, norm_pix_loss)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from hf_mim.models import MaeConfig, MaeForPreTraining

    shape = {field: getattr(preset, field) for field in (
        "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
        "decoder_intermediate_size",
    )}
    common = dict(shape, mask_ratio=0.75, norm_pix_loss=True, layer_norm_eps=1e-6, qkv_bias=True,
                  hidden_act="gelu", attn_implementation="sdpa")
    ours = MaeForPreTraining(MaeConfig(**common))
    peer = ViTMAEForPreTraining(ViTMAEConfig(**common))
    num_patches = (preset.image_size // preset.patch_size) ** 2

    def make_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        size = (preset.batch_size, 3, preset.image_size, preset.image_size)
        pixel_values = torch.randn(size, generator=generator)
        noise = torch.rand((preset.batch_size, num_patches), generator=generator)  # same masks for both
        return {"pixel_values": pixel_values.to(device), "noise": noise.to(device)}

    return Pair(ours.to(device), peer.to(device), make_batch, output_loss)


# BEiT masks 75 of its 14x14 patches; the count is what costs, so the benchmark draws that share at random.
BEIT_MASK_RATIO = 75 / 196
BEIT_VOCAB_SIZE = 8192


def beit_shape(preset: Preset) -> dict:
    """The BEiT v1 pre-training model at the preset's size: shared relative position bias, no absolute
    positions, layer scale 0.1, drop path 0.1, LayerNorm eps 1e-6, 8192 visual tokens."""
    shape = {field: getattr(preset, field) for field in (
        "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    )}
    return dict(shape, vocab_size=BEIT_VOCAB_SIZE, use_absolute_position_embeddings=False,
                use_shared_relative_position_bias=True, use_relative_position_bias=False, layer_scale_init_value=0.1,
                drop_path_rate=0.1, layer_norm_eps=1e-6, hidden_act="gelu", attn_implementation="sdpa")


def beit_batch_maker(preset: Preset, device: torch.device, with_tokenizer_view: bool):
    """make_batch: normalised pixels, a mask of BEIT_MASK_RATIO of the patches, random token ids of all
    patches (v1 timing excludes the tokenizer) or [0, 1] pixels for the tokenizer (v2's full step)."""
    from hf_mim.models.masking import random_patch_selection

    num_patches = (preset.image_size // preset.patch_size) ** 2

    def make_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        size = (preset.batch_size, 3, preset.image_size, preset.image_size)
        batch = {"pixel_values": torch.randn(size, generator=generator),  # [B, 3, H, W]
                 "bool_masked_pos": random_patch_selection(preset.batch_size, num_patches, BEIT_MASK_RATIO, generator)}
        if with_tokenizer_view:
            batch["tokenizer_pixel_values"] = torch.rand(size, generator=generator)  # [B, 3, H, W] in [0, 1]
        else:
            batch["labels"] = torch.randint(0, BEIT_VOCAB_SIZE, (preset.batch_size, num_patches), generator=generator)
        return {key: value.to(device) for key, value in batch.items()}

    return make_batch


def build_beit_pair(preset: Preset, device: torch.device) -> Pair:
    """hf_mim BEiTForMaskedImageModeling vs transformers BeitForMaskedImageModeling (sdpa), tokenizer excluded
    (as PEER_BASELINES.md): ours takes the token ids of all patches, transformers only the masked ones."""
    from transformers import BeitConfig, BeitForMaskedImageModeling

    from hf_mim.models import BEiTConfig, BEiTForMaskedImageModeling

    ours = BEiTForMaskedImageModeling(BEiTConfig(**beit_shape(preset)))
    peer = BeitForMaskedImageModeling(BeitConfig(**beit_shape(preset), use_mask_token=True))

    def peer_loss(model: nn.Module, batch: dict) -> torch.Tensor:
        mask = batch["bool_masked_pos"]
        return model(pixel_values=batch["pixel_values"], bool_masked_pos=mask, labels=batch["labels"][mask]).loss

    return Pair(ours.to(device), peer.to(device), beit_batch_maker(preset, device, False), output_loss, peer_loss)


class CodebookIndices(nn.Module):
    """A tokenizer's `get_codebook_indices` as `forward`, so that torch.compile compiles it."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer.requires_grad_(False).eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.get_codebook_indices(pixel_values).flatten(1)  # [B, N]


def build_vqkd_tokenizer(preset: Preset, device: torch.device) -> CodebookIndices:
    """BEiT v2's VQ-KD encoder at the preset's size (8192 x 32 codebook); the decoder is never run."""
    from hf_mim.models import VqkdConfig, VqkdTokenizer

    shape = {field: getattr(preset, field) for field in (
        "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    )}
    config = VqkdConfig(**shape, decoder_hidden_size=preset.hidden_size, decoder_num_hidden_layers=1,
                        decoder_num_attention_heads=preset.num_attention_heads,
                        decoder_intermediate_size=preset.intermediate_size, num_codes=BEIT_VOCAB_SIZE, code_dim=32,
                        teacher_name_or_path=None, teacher_type="auto", attn_implementation="sdpa")
    return CodebookIndices(VqkdTokenizer(config)).to(device)


def build_beitv2_pair(preset: Preset, device: torch.device) -> Pair:
    """Our full BEiT v2 step: the VQ-KD tokenizer's forward (no grad, eager, under the step's autocast, as in
    the training loop) and the MIM model with its CLS-aggregation head. No transformers peer exists."""
    from hf_mim.models import BEiTConfig, BEiTForMaskedImageModeling

    config = BEiTConfig(**beit_shape(preset), use_cls_pretext_head=True,
                        cls_head_early_layer=max(1, preset.num_hidden_layers - 3))  # 9 of 12
    tokenizer = build_vqkd_tokenizer(preset, device)

    def full_step_loss(model: nn.Module, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            labels = tokenizer(batch["tokenizer_pixel_values"])  # [B, N]
        return model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"], labels=labels).loss

    model = BEiTForMaskedImageModeling(config).to(device)
    return Pair(model, None, beit_batch_maker(preset, device, True), full_step_loss)


def build_beitv2_tokenizer_pair(preset: Preset, device: torch.device) -> Pair:
    """The VQ-KD tokenizer's forward alone (train=False), to show its share of the BEiT v2 step."""
    def tokenize(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["tokenizer_pixel_values"])

    return Pair(build_vqkd_tokenizer(preset, device), None, beit_batch_maker(preset, device, True), tokenize,
                train=False)


# name -> builder(preset, device) -> Pair.
PAIRS: dict[str, Callable[[Preset, torch.device], Pair]] = {
    "mae": build_mae_pair,
    "beit": build_beit_pair,
    "beitv2": build_beitv2_pair,
    "beitv2-tokenizer": build_beitv2_tokenizer_pair,
}


@dataclass
class Result:
    pair: str
    mode: str  # eager | compile
    side: str  # ours | peer
    images_per_s: float  # median over repeats
    images_per_s_repeats: list[float]
    peak_memory_gb: float | None  # CUDA only
    trainable_params: int


class Runner:
    """One side of a pair in one mode: the (compiled) model, its optimizer and its step."""

    def __init__(self, model: nn.Module, loss_fn, pair: Pair, preset: Preset, device: torch.device,
                 compile_options: dict | None):
        self.model = model.train(pair.train)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.callable = torch.compile(model, **compile_options) if compile_options is not None else model
        self.loss_fn = loss_fn
        self.train = pair.train
        self.device = device
        self.autocast_dtype = torch.bfloat16 if preset.bf16 and device.type == "cuda" else None
        self.optimizer = None
        if pair.train:
            fused = True if device.type in ("cuda", "cpu") else None  # the same optimizer kernel for both sides
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.05, fused=fused)

    def step(self, batch: dict) -> None:
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            if not self.train:
                with torch.no_grad():
                    self.loss_fn(self.callable, batch)
                return
            loss = self.loss_fn(self.callable, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """Device memory this side keeps between its steps: weights, buffers, optimizer state."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        if self.optimizer is not None:
            tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                    if t.device.type == "cuda"}
        return sum(storages.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_block(runner: Runner, batches: list[dict], warmup: int, steps: int) -> float:
    """Seconds for `steps` steps after `warmup` untimed ones, rotating over `batches`."""
    for i in range(warmup):
        runner.step(batches[i % len(batches)])
    synchronize(runner.device)
    start = time.perf_counter()
    for i in range(steps):
        runner.step(batches[i % len(batches)])
    synchronize(runner.device)
    return time.perf_counter() - start


def run_pair(name: str, preset: Preset, device: torch.device, modes=("eager", "compile"),
             compile_options: dict | None = None, seed: int = 0,
             record: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Time both sides of pair `name` in each mode; `compile_options` go to torch.compile. `record(rows)`
    gets each mode's rows as soon as they are timed (the GPU check saves them then)."""
    results = []
    for mode in modes:
        torch.manual_seed(seed)
        pair = PAIRS[name](preset, device)
        generator = torch.Generator().manual_seed(seed)
        batches = [pair.make_batch(generator) for _ in range(2)]
        sides = {"ours": (pair.ours, pair.ours_loss)}
        if pair.peer is not None:
            sides["peer"] = (pair.peer, pair.peer_loss or pair.ours_loss)
        options = (compile_options or {}) if mode == "compile" else None
        runners = {side: Runner(model, loss_fn, pair, preset, device, options)
                   for side, (model, loss_fn) in sides.items()}
        speeds = {side: [] for side in runners}
        peaks = {side: 0 for side in runners}
        for repeat in range(preset.repeats):
            order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
            for side in order:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = timed_block(runners[side], batches, preset.warmup, preset.steps)
                speeds[side].append(preset.batch_size * preset.steps / seconds)
                if device.type == "cuda":
                    # Both models are resident: take out what the other side keeps between its steps.
                    others = sum(runners[o].resident_bytes() for o in runners if o != side)
                    peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated(device) - others)
        rows = [Result(pair=name, mode=mode, side=side, images_per_s=statistics.median(speeds[side]),
                       images_per_s_repeats=speeds[side],
                       peak_memory_gb=peaks[side] / 1e9 if device.type == "cuda" else None,
                       trainable_params=sum(p.numel() for p in runner.params))
                for side, runner in runners.items()]
        results += rows
        if record is not None:
            record(rows)
        del pair, batches, runners
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def format_table(results: list[Result]) -> str:
    by_key = {(r.pair, r.mode, r.side): r for r in results}
    width = max([8] + [len(r.pair) + 2 for r in results])  # "beitv2-tokenizer" is longer than the header
    lines = [f"{'pair':<{width}}{'mode':<9}{'ours img/s':>12}{'peer img/s':>12}{'ours/peer':>11}"
             f"{'ours GB':>9}{'peer GB':>9}"]
    for pair, mode in dict.fromkeys((r.pair, r.mode) for r in results):
        ours, peer = by_key[(pair, mode, "ours")], by_key.get((pair, mode, "peer"))
        ratio = f"{ours.images_per_s / peer.images_per_s:.2f}x" if peer else "-"
        memory = [f"{r.peak_memory_gb:.1f}" if r and r.peak_memory_gb is not None else "-" for r in (ours, peer)]
        peer_speed = f"{peer.images_per_s:,.0f}" if peer else "-"
        lines.append(f"{pair:<{width}}{mode:<9}{ours.images_per_s:>12,.0f}{peer_speed:>12}{ratio:>11}"
                     f"{memory[0]:>9}{memory[1]:>9}")
        if mode == "compile" and peer and (pair, "eager", "ours") in by_key:
            best = max(ours.images_per_s, by_key[(pair, "eager", "ours")].images_per_s)
            lines.append(f"{'':<{width}}best ours / peer compiled: {best / peer.images_per_s:.2f}x")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} logical cores"


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
    }


def configure_device(device: torch.device) -> None:
    if device.type == "cuda":
        set_tf32(True)  # for any float32 matmul/conv left outside autocast (the peers were measured with it)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="vit-b16 on CUDA, cpu-tiny otherwise (default: chosen by device)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--models", default="mae", help=f"comma-separated pairs among {sorted(PAIRS)}")
    parser.add_argument("--batch_size", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before each block")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per model (median reported)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile'd models (default: yes)")
    parser.add_argument("--compile_only", action="store_true", help="time only the compiled models (no eager blocks)")
    parser.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True): fail on graph breaks")
    parser.add_argument("--torch_compile_mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--torch_compile_backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results and environment to this file")
    args = parser.parse_args(argv)
    for key in ("batch_size", "steps", "repeats"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    unknown = [name for name in args.models.split(",") if name not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {unknown} in --models; choose among {sorted(PAIRS)}")
    return args


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset_name = args.preset or ("vit-b16" if device.type == "cuda" else "cpu-tiny")
    overrides = {key: getattr(args, key) for key in ("batch_size", "steps", "warmup", "repeats")
                 if getattr(args, key) is not None}
    preset = dataclasses.replace(PRESETS[preset_name], **overrides)
    configure_device(device)
    modes = ("compile",) if args.compile_only else (("eager", "compile") if args.compile else ("eager",))
    compile_options = {"fullgraph": args.fullgraph, "mode": args.torch_compile_mode,
                       "backend": args.torch_compile_backend}
    env = environment(device)
    print(f"{preset_name} on {env['device']} ({device}), torch {env['torch']}, transformers {env['transformers']}")
    print(preset)
    results = []

    def record(rows: list[Result]) -> None:  # the JSON holds every finished row: a run out of time keeps them
        results.extend(rows)
        if args.json:
            write_json(args.json, env, preset_name, preset, modes, compile_options, results)

    for name in args.models.split(","):
        run_pair(name, preset, device, modes, compile_options, seed=args.seed, record=record)
    for r in results:
        repeats = ", ".join(f"{speed:,.0f}" for speed in r.images_per_s_repeats)
        print(f"{r.pair} {r.mode} {r.side}: {r.trainable_params:,} trainable params, img/s per repeat [{repeats}], "
              f"best {max(r.images_per_s_repeats):,.0f}")
    print(format_table(results))
    return results


def write_json(path: str, env: dict, preset_name: str, preset: Preset, modes, compile_options: dict,
               results: list[Result]) -> None:
    with open(path, "w") as handle:
        json.dump({
            "environment": env, "preset_name": preset_name, "preset": dataclasses.asdict(preset),
            "modes": list(modes), "compile_options": compile_options,
            "results": [dataclasses.asdict(r) for r in results],
        }, handle, indent=2)


if __name__ == "__main__":
    main()
