"""Merge the parts of `benchmarks/gpu_check.sh` into OUT/gpu_check.json and OUT/gpu_check.md.

    python benchmarks/gpu_check_report.py OUT

A part whose JSON is missing (it failed or ran out of time; see OUT/<part>.log) is listed as missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import markdown as data_pipeline_tables  # noqa: E402

THROUGHPUT_PARTS = ("throughput_eager", "throughput_compiled_mae", "throughput_compiled_beit",
                    "throughput_compiled_beitv2", "throughput_tokenizer")
DATA_PARTS = ("data_host", "data_e2e")


def load(out: Path, part: str) -> dict | None:
    path = out / f"{part}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def throughput_table(results: list[dict]) -> str:
    """ours vs transformers per pair and mode, with peak memory (GB; '-' off CUDA)."""
    by_key = {(r["pair"], r["mode"], r["side"]): r for r in results}
    lines = ["| pair | mode | ours img/s | transformers img/s | ours/theirs | ours GB | theirs GB |",
             "|---|---|---|---|---|---|---|"]
    for pair, mode in dict.fromkeys((r["pair"], r["mode"]) for r in results):
        ours, peer = by_key[(pair, mode, "ours")], by_key.get((pair, mode, "peer"))

        def memory(result):
            return "-" if result is None or result["peak_memory_gb"] is None else f"{result['peak_memory_gb']:.1f}"

        ratio = f"{ours['images_per_s'] / peer['images_per_s']:.2f}x" if peer else "-"
        peer_speed = f"{peer['images_per_s']:,.0f}" if peer else "-"
        lines.append(f"| {pair} | {mode} | {ours['images_per_s']:,.0f} | {peer_speed} | {ratio} | {memory(ours)} | "
                     f"{memory(peer)} |")
    return "\n".join(lines) + "\n"


def main(out: Path) -> dict:
    parts = {part: load(out, part) for part in THROUGHPUT_PARTS + DATA_PARTS}
    missing = [part for part, report in parts.items() if report is None]
    throughput = [r for part in THROUGHPUT_PARTS if parts[part] for r in parts[part]["results"]]
    environment = next((parts[p]["environment"] for p in THROUGHPUT_PARTS + DATA_PARTS if parts[p]), {})
    data = {key: value for part in DATA_PARTS if parts[part] for key, value in parts[part].items()
            if key in ("host", "torchvision_plain_img_s", "decode", "e2e", "complete", "jpeg_kb")}
    if parts["data_host"] or parts["data_e2e"]:
        data["environment"] = (parts["data_host"] or parts["data_e2e"])["environment"]
    report = {"environment": environment, "throughput": throughput, "data_pipeline": data, "missing": missing}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    sections = [f"# GPU check: {environment.get('device', '?')}, {environment.get('date', '?')}\n"]
    if throughput:
        sections.append(throughput_table(throughput))
    if data:
        sections.append(data_pipeline_tables(data))
    if missing:
        sections.append(f"Missing parts (failed or out of time, see their logs): {', '.join(missing)}\n")
    text = "\n".join(sections)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check"))
