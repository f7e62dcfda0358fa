"""The throughput benchmark runs end to end on a micro config (no timing assertions)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("hf_mim_benchmark_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    torch._dynamo.reset()


@pytest.fixture
def micro(throughput):
    return throughput.Preset(16, 8, 32, 1, 2, 64, 32, 1, 2, 64, batch_size=2, warmup=1, steps=1, repeats=2, bf16=True)


def test_mae_pair_eager_and_fullgraph_compile(throughput, micro):
    # backend="eager": dynamo traces the forward as inductor would, without code generation (seconds, not a minute);
    # fullgraph=True makes any graph break in either model an error.
    options = {"fullgraph": True, "backend": "eager"}
    results = throughput.run_pair("mae", micro, torch.device("cpu"), ("eager", "compile"), options)
    assert {(r.mode, r.side) for r in results} == {(m, s) for m in ("eager", "compile") for s in ("ours", "peer")}
    for r in results:
        assert len(r.images_per_s_repeats) == micro.repeats
        assert r.images_per_s > 0 and all(speed > 0 for speed in r.images_per_s_repeats)
        assert r.peak_memory_gb is None  # CPU: no device memory figure
    ours, peer = (next(r for r in results if r.side == side) for side in ("ours", "peer"))
    assert ours.trainable_params == peer.trainable_params  # the same architecture on both sides
    assert "ours/peer" in throughput.format_table(results)


def test_forward_only_pair_without_peer(throughput, micro, monkeypatch):
    # The shape later pairs take (e.g. a tokenizer timed alone): no peer, no optimizer.
    def forward_only(preset, device):
        return dataclasses.replace(throughput.build_mae_pair(preset, device), peer=None, train=False)

    monkeypatch.setitem(throughput.PAIRS, "mae-forward", forward_only)
    results = throughput.run_pair("mae-forward", micro, torch.device("cpu"), ("eager",))
    assert [r.side for r in results] == ["ours"] and results[0].images_per_s > 0
    assert "-" in throughput.format_table(results)


def test_beit_pair_same_model_on_both_sides(throughput, micro):
    # Ours takes the token ids of every patch, transformers' only the masked ones: the same work. Not
    # fullgraph: gathering the masked tokens with a boolean index has a data-dependent shape (both models).
    results = throughput.run_pair("beit", micro, torch.device("cpu"), ("eager", "compile"),
                                  {"fullgraph": False, "backend": "eager"})
    assert {(r.mode, r.side) for r in results} == {(m, s) for m in ("eager", "compile") for s in ("ours", "peer")}
    ours, peer = (next(r for r in results if r.side == side and r.mode == "eager") for side in ("ours", "peer"))
    assert ours.trainable_params == peer.trainable_params and ours.images_per_s > 0 < peer.images_per_s


def test_beitv2_full_step_and_tokenizer_alone(throughput, micro):
    step, = throughput.run_pair("beitv2", micro, torch.device("cpu"), ("eager",))
    tokenizer, = throughput.run_pair("beitv2-tokenizer", micro, torch.device("cpu"), ("eager",))
    assert step.side == tokenizer.side == "ours" and step.images_per_s > 0 and tokenizer.images_per_s > 0
    assert tokenizer.trainable_params == 0  # frozen, timed without an optimizer
    table = throughput.format_table([step, tokenizer])
    assert "beitv2-tokenizer  eager" in table


def test_cli_writes_json(throughput, tmp_path):
    out = tmp_path / "results.json"
    throughput.main(["--preset", "cpu-tiny", "--batch_size", "2", "--steps", "1", "--warmup", "0",
                     "--repeats", "1", "--no-compile", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["preset"]["batch_size"] == 2 and report["modes"] == ["eager"]
    assert sorted(r["side"] for r in report["results"]) == ["ours", "peer"]
    with pytest.raises(SystemExit):
        throughput.main(["--models", "mae,nope"])


# ---------------------------------------------------------------------------------------------
# The input pipeline benchmark and the prepared GPU check
# ---------------------------------------------------------------------------------------------

BENCHMARKS = SCRIPT.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"hf_mim_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_data_pipeline_host_figures_of_every_method(tmp_path):
    data_pipeline = load_script("data_pipeline")
    report = data_pipeline.main(["--smoke", "--sections", "host", "--json", str(tmp_path / "r.json"),
                                 "--markdown", str(tmp_path / "r.md")])
    assert [r["method"] for r in report["host"]] == list(data_pipeline.METHODS)
    assert all(r[key] > 0 for r in report["host"] for key in ("reference_img_s", "fast_host_img_s", "fast_device_img_s",
                                                              "device_decoding_host_img_s"))
    assert report["decode"]["decode_img_s"] > 0  # on the CPU, libjpeg-turbo: Pillow's pixels for every kind of JPEG
    assert {kind: values["max_levels"] for kind, values in report["decode"]["decode_agreement_by_kind"].items()} == {
        kind: 0 for kind in ("files", *data_pipeline.DECODE_VARIANTS)}
    assert report["torchvision_plain_img_s"] > 0 and report["jpeg_kb"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["environment"]["device"] == "cpu"
    assert "| beitv2 |" in (tmp_path / "r.md").read_text()


def run_gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    """gpu_check.sh runs `python3` as on the device; here, this interpreter (a venv need not be activated)."""
    env = {"PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), str(out)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=3000)


def check_gpu_check_output(out: Path, done: subprocess.CompletedProcess) -> dict:
    """What the device machine returns: at most 8 files, the report, and every part's log and JSON in one archive."""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check.tar.gz"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["missing"] == {}, done.stdout[-6000:]
    assert {r["pair"] for r in report["throughput"]} == {"mae", "beit", "beitv2", "beitv2-tokenizer"}
    assert {r["mode"] for r in report["throughput"]} == {"eager", "compile"}
    assert report["data_pipeline"]["e2e"][0]["e2e_img_s"] > 0 and report["data_pipeline"]["host"]
    assert [r["jpeg_decoding"] for r in report["data_pipeline"]["e2e"]] == ["device", "host"]
    assert all(row.get("e2e_img_s", 0) > 0 for row in report["data_pipeline"]["e2e"])  # no row failed
    assert report["data_pipeline"]["complete"] and report["data_pipeline"]["decode"]["decode_img_s"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| mae | eager |" in table and "e2e / model" in table
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    parts = [part["part"] for part in report["parts"]]
    assert {f"{part}.log" for part in parts} | {f"{part}.json" for part in parts} | {"parts.tsv"} <= names
    return report


def test_gpu_check_smoke_mode_returns_three_files(tmp_path):
    """SMOKE=1: every part of benchmarks/gpu_check.sh on the CPU, tiny, then the merged report and the archive."""
    check_gpu_check_output(tmp_path / "check", run_gpu_check(tmp_path / "check", SMOKE="1"))


@pytest.mark.skipif(os.environ.get("HF_MIM_GPU_CHECK_REHEARSE") != "1",
                    reason="minutes (builds a venv of the device image's packages): HF_MIM_GPU_CHECK_REHEARSE=1")
def test_gpu_check_rehearsal_in_the_device_images_packages(tmp_path):
    """REHEARSE=1: the whole check in a fresh venv holding only the device image's packages (transformers 5.17,
    huggingface_hub 1.33, no datasets) plus the carried wheels."""
    report = check_gpu_check_output(tmp_path / "check", run_gpu_check(tmp_path / "check", REHEARSE="1"))
    packages = json.loads((tmp_path / "check" / "gpu_check.json").read_text())["packages"]
    assert packages["transformers"] == "5.17.0" and packages["huggingface_hub"] == "1.33.0", packages
    assert report["parts"][0]["part"] == "preflight"


def test_gpu_check_report_needs_only_the_standard_library(tmp_path):
    """The report is written without site-packages (python -I -S), a part out of time and a skipped one listed."""
    (tmp_path / "parts.tsv").write_text("preflight\t60\tok\t0\t3\nthroughput_eager_mae\t35\tout of time\t124\t35\n"
                                        "throughput_compiled_beit\t9\tskipped: budget\t-1\t0\n"
                                        "data_host\t40\tout of time\t124\t40\n")
    (tmp_path / "preflight.json").write_text(json.dumps({"packages": {"transformers": "5.17.0"}, "device": "H100"}))
    row = {"pair": "mae", "mode": "eager", "side": "ours", "images_per_s": 900.0, "peak_memory_gb": 20.0}
    (tmp_path / "throughput_eager_mae.json").write_text(json.dumps({"environment": {"date": "2026-12-07"},
                                                                     "results": [row]}))
    host_row = {"method": "mae", "reference_img_s": 100.0, "fast_host_img_s": 300.0, "host_speedup": 3.0,
                "fast_device_img_s": 5000.0, "device_decoding_host_img_s": 900.0, "device_decoding_host_speedup": 9.0}
    (tmp_path / "data_host.json").write_text(json.dumps({"environment": {"device": "cuda"}, "host": [host_row]}))
    done = subprocess.run([sys.executable, "-I", "-S", str(BENCHMARKS / "gpu_check_report.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["missing"] == {"throughput_eager_mae": "out of time", "throughput_compiled_beit": "skipped: budget",
                                 "data_host": "out of time"}
    assert report["data_pipeline"]["host"] == [host_row]  # a partial host section: its first method's row
    assert report["throughput"] == [row]  # the rows saved before the limit
    assert "| mae | eager | 900 |" in (tmp_path / "gpu_check.md").read_text()


def test_segmentation_transfer_compares_both_backbones_per_seed(tmp_path):
    """Real pre-training and two real segmentation runs per seed, tiny: the JSON holds both sides."""
    transfer = load_script("segmentation_transfer")
    results = transfer.main(["--unlabelled_scenes", "16", "--pretrain_steps", "2", "--pretrain_batch_size", "8",
                             "--num_scenes", "24", "--seg_epochs", "1", "--seeds", "0,1", "--decoder_channels", "8",
                             "--output_dir", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json")])
    assert [run["seed"] for run in results["runs"]] == [0, 1]
    for run in results["runs"]:
        assert set(run["pretrained"]) == set(run["random"]) >= {"mean_iou", "iou_background"}
        assert run["difference"] == round(run["pretrained"]["mean_iou"] - run["random"]["mean_iou"], 4)
    assert (tmp_path / "runs" / "mae" / "model.safetensors").exists()  # the encoder both pre-trained runs start from
    readout = results["ink_readout_iou"]  # the patch embedding's and each of the 4 blocks' tokens
    assert len(readout["pretrained"]) == len(readout["random"]) == 5
    assert all(0 < iou <= 1 for side in readout.values() for iou in side)
    assert json.loads((tmp_path / "r.json").read_text())["mean_difference"] == results["mean_difference"]


def test_token_agreement_smoke_writes_a_row_per_precision(tmp_path):
    """benchmarks/token_agreement.py (the GPU check's token-agreement part) end to end on tiny tokenizers."""
    spec = importlib.util.spec_from_file_location("hf_mim_benchmark_token_agreement",
                                                  SCRIPT.parent / "token_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--device", "cpu", "--json", str(tmp_path / "token_agreement.json")])
    in_force = {(row["tokenizer"], row["asked"]): row["in_force"] for row in report["rows"]}
    assert in_force[("dvae", "reference")] == "reference_fp16"  # the converted-DALL-E numerics by default
    assert all(0.0 <= row["agreement_with_fp32"] <= 1.0 for row in report["rows"])
    assert json.loads((tmp_path / "token_agreement.json").read_text())["rows"] == report["rows"]
    assert "| dvae | reference | reference_fp16 |" in (tmp_path / "token_agreement.md").read_text()


# ---------------------------------------------------------------------------------------------
# Does pre-training pay off? (pretraining_pays.py)
# ---------------------------------------------------------------------------------------------

def write_tiny_cifar(folder: Path, count: int, seed: int) -> Path:
    """A CIFAR-shaped parquet (32 px RGB images, 10 classes): each class its own colour, plus noise."""
    import datasets
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    labels = [index % 10 for index in range(count)]
    images = []
    for label in labels:
        colour = torch.tensor([label * 25, 255 - label * 25, (label * 70) % 256], dtype=torch.float32)
        pixels = (colour[None, None] + 40 * torch.randn(32, 32, 3, generator=generator)).clamp(0, 255)
        images.append(Image.fromarray(pixels.to(torch.uint8).numpy()))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    path = folder / f"cifar-{seed}.parquet"
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return path


def test_pretraining_pays_rows_at_both_compute_budgets(tmp_path):
    """Real pre-training (one run, its checkpoints the lengths), fine-tuning and probes, micro scale."""
    pays = load_script("pretraining_pays")
    argv = ["--train_file", str(write_tiny_cifar(tmp_path, 48, seed=0)),
            "--test_file", str(write_tiny_cifar(tmp_path, 20, seed=1)), "--preset", "micro",
            "--pretrain_steps", "0,2,4", "--pretrain_batch_size", "8", "--pretrain_warmup", "1", "--labels", "20",
            "--finetune_steps", "2", "--finetune_batch_size", "8", "--eval_samples", "20", "--seeds", "0",
            "--device", "cpu", "--output_dir", str(tmp_path / "out"), "--json", str(tmp_path / "s.json")]
    summary = pays.main(argv)
    flops = summary["flops_per_step"]
    assert 0 < flops["pretrain_step"] and 0 < flops["finetune_step"]
    by_length = {row["pretrain_steps"]: row for row in summary["table"]}
    assert sorted(by_length) == [0, 2, 4]
    for length, row in by_length.items():
        assert row["equal_compute_random_steps"] == 2 + round(length * flops["pretrain_step"] / flops["finetune_step"])
        assert 0 <= row["pretrained_top1"] <= 1 and 0 <= row["random_equal_compute_top1"] <= 1
        assert row["gain_equal_compute"] == round(row["pretrained_top1"] - row["random_equal_compute_top1"], 4)
        assert row["linear_top1"] is not None and row["knn_top1"] is not None
    assert by_length[0]["gain_equal_steps"] == by_length[0]["gain_equal_compute"] == 0  # random vs itself
    assert by_length[4]["equal_compute_random_steps"] > by_length[2]["equal_compute_random_steps"] > 2
    # the 4-step model is the run's last step: the checkpoint turned model holds the run's final weights
    from safetensors.torch import load_file

    pretraining = tmp_path / "out" / "pretraining"
    final, checkpoint = (load_file(folder / "model.safetensors") for folder in (pretraining / "run", pretraining / "mae-4"))
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)
    earlier = load_file(pretraining / "mae-2" / "model.safetensors")
    assert not all(torch.equal(final[k], earlier[k]) for k in final)  # 2 steps earlier: other weights
    rows = (tmp_path / "out" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 2 + 1 + 3  # fine-tune + probe per length > 0, the random probe, 3 random fine-tunes
    assert pays.main(argv)["table"] == summary["table"]  # a second call runs nothing again
    assert (tmp_path / "out" / "rows.jsonl").read_text().splitlines() == rows
    assert json.loads((tmp_path / "s.json").read_text())["table"] == summary["table"]


def test_pretraining_pays_counts_flops_per_image(tmp_path):
    pays = load_script("pretraining_pays")
    from hf_mim import MaeConfig, MaeForPreTraining

    model = MaeForPreTraining(MaeConfig(**pays.ARCHITECTURES["micro"]))
    assert pays.step_flops(model, 4) == 2 * pays.step_flops(model, 2) > 0
    flops = {"pretrain_step": 3, "finetune_step": 4}
    assert pays.equal_compute_steps(0, flops, 10) == 10 and pays.equal_compute_steps(100, flops, 10) == 85


def test_cpu_bf16_times_both_precisions_and_names_the_machine(tmp_path):
    report = load_script("cpu_bf16").main(["--batch_size", "2", "--steps", "1", "--json", str(tmp_path / "r.json")])
    assert report["fp32_s"] > 0 and report["bf16_s"] > 0
    assert report["bf16_over_fp32"] == pytest.approx(report["bf16_s"] / report["fp32_s"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["environment"]["date"] and saved["environment"]["device"] and saved["native_bf16"] in (True, False, None)
