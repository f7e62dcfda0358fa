"""Merge the parts of `benchmarks/gpu_check.sh` into gpu_check.json and gpu_check.md.

    python3 benchmarks/gpu_check_report.py WORK [OUT]     # reads WORK/<part>.json and WORK/parts.tsv

Standard library only, so that the report is written whatever the device image lacks. Each part writes
WORK/<part>.json (row by row); WORK/parts.tsv says how each part ended (ok, failed, out of time, skipped
for lack of time). A part without JSON is listed as missing with that reason; its log is in the archive.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline_tables import markdown as data_pipeline_tables  # noqa: E402

DATA_PARTS = ("data_host", "data_e2e")
DATA_KEYS = ("host", "torchvision_plain_img_s", "decode", "e2e", "complete", "jpeg_kb")


def fsdp_section(row: dict) -> str:
    """fsdp_check.py's row: FSDP2 through accelerate, a sharded checkpoint, and the resume's weights."""
    if "refusal" in row:
        return f"FSDP2 on this machine: refused as it must be without a GPU: {row.get('refusal')}\n"
    verdict = "passed" if row.get("passed") else "FAILED"
    return (f"FSDP2 ({row.get('processes', '?')} process(es), {row.get('steps', '?')} steps, sharded checkpoint at "
            f"step 2): {verdict}; sharded files {len(row.get('sharded_files') or [])}, resumed vs uninterrupted "
            f"weights relative L2 {row.get('resumed_vs_uninterrupted_relative_l2', 'n/a')}\n"
            + (f"\n```\n{row['error'][-1500:]}\n```\n" if row.get("error") else ""))


def token_agreement_section(report: dict) -> str:
    """token_agreement.py's rows: the tokens each --tokenizer_precision gives, against fp32 tokens."""
    lines = ["| tokenizer | --tokenizer_precision | in force | tokens equal to fp32 |", "|---|---|---|---|"]
    lines += [f"| {r['tokenizer']} | {r['asked']} | {r['in_force']} | {r['agreement_with_fp32']:.4f} |"
              for r in report.get("rows", [])]
    return "Token agreement with fp32:\n\n" + "\n".join(lines) + "\n"


# Parts whose JSON has its own section: name -> function(report) -> markdown.
OTHER_SECTIONS: dict = {"fsdp_check": fsdp_section, "token_agreement": token_agreement_section}


def read_parts(work: Path) -> list[dict]:
    """parts.tsv rows: name, limit_s, status, exit code, seconds, in the order they ran (or were skipped)."""
    path = work / "parts.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [{"part": row[0], "limit_s": int(row[1]), "status": row[2], "exit_code": int(row[3]), "seconds": int(row[4])}
            for row in rows]


def load(work: Path, part: str) -> dict | None:
    path = work / f"{part}.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:  # cut off mid-write by the part's time limit: the previous rows are lost too
        return None


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


def parts_table(parts: list[dict]) -> str:
    lines = ["| part | status | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['limit_s']} |" for p in parts]
    return "\n".join(lines) + "\n"


def main(work: Path, out: Path | None = None) -> dict:
    out = out or work
    parts = read_parts(work)
    names = [p["part"] for p in parts]
    reports = {name: load(work, name) for name in names}
    throughput = [row for name in names if name.startswith("throughput_") and reports[name]
                  for row in reports[name]["results"]]
    data = {key: value for name in DATA_PARTS if reports.get(name) for key, value in reports[name].items()
            if key in DATA_KEYS}
    environment = next((reports[name]["environment"] for name in names if reports[name]
                        and "environment" in reports[name]), {})
    if data:
        data["environment"] = next(reports[name]["environment"] for name in DATA_PARTS if reports.get(name))
    preflight = reports.get("preflight") or {}
    missing = {p["part"]: p["status"] for p in parts if reports[p["part"]] is None or p["status"] != "ok"}
    report = {"environment": environment, "packages": preflight.get("packages", {}), "parts": parts,
              "throughput": throughput, "data_pipeline": data, "missing": missing,
              "other": {name: reports[name] for name in OTHER_SECTIONS if reports.get(name)}}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    device = preflight.get("device") or environment.get("device", "?")
    sections = [f"# GPU check: {device}, {environment.get('date', preflight.get('date', '?'))}\n"]
    if report["packages"]:
        sections.append("Packages: " + ", ".join(f"{name} {version}" for name, version in report["packages"].items())
                        + "\n")
    if throughput:
        sections.append(throughput_table(throughput))
    if data:
        sections.append(data_pipeline_tables(data))
    sections += [render(reports[name]) for name, render in OTHER_SECTIONS.items() if reports.get(name)]
    sections.append(parts_table(parts))
    if missing:
        sections.append("Missing or partial: " + ", ".join(f"{name} ({status})" for name, status in missing.items())
                        + "; their logs are in gpu_check.tar.gz\n")
    text = "\n".join(sections)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check"), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
