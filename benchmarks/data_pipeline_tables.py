"""The markdown tables of `data_pipeline.py`'s report, with the standard library only: the GPU check's
report (`gpu_check_report.py`) is written with them even where `data_pipeline.py` cannot be imported."""

from __future__ import annotations


def markdown(report: dict) -> str:
    lines = []
    if report.get("host"):
        lines += ["| method | reference img/s/core | fast host img/s/core | host speed-up | fast device part img/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['reference_img_s']:.0f} | {r['fast_host_img_s']:.0f} | "
                  f"{r['host_speedup']:.2f}x | {r['fast_device_img_s']:.0f} ({report['environment']['device']}) |"
                  for r in report["host"]]
        if "torchvision_plain_img_s" in report:  # measured after the methods' rows (absent from a partial report)
            lines.append(f"| plain torchvision v2 (RandomResizedCrop + flip + normalise) | "
                         f"{report['torchvision_plain_img_s']:.0f} | - | - | - |")
        lines += ["", "Device decoding (`--jpeg_decoding device`): the workers ship JPEG bytes, the training process "
                  "decodes.", "", "| method | worker img/s/core | vs reference |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['device_decoding_host_img_s']:.0f} | {r['device_decoding_host_speedup']:.2f}x |"
                  for r in report["host"]]
    if report.get("decode"):
        decode, agreement = report["decode"], report["decode"]["decode_agreement"]
        lines += ["", f"decode_jpeg in the training process on {decode['decode_device']}: {decode['decode_img_s']:.0f} "
                  f"img/s (batches of 32); pixels vs Pillow: max {agreement['max_levels']}, mean "
                  f"{agreement['mean_levels']:.3f} uint8 levels"]
        lines += [f"- {kind}: max {values['max_levels']}, mean {values['mean_levels']:.3f} levels"
                  for kind, values in decode.get("decode_agreement_by_kind", {}).items() if kind != "files"]
    if report.get("e2e"):
        lines += ["", "| method | e2e img/s (real loader) | model only img/s (synthetic) | e2e / model | data wait |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} ({r['pipeline']} path{e2e_decoding(r)}) | {r['e2e_img_s']:.1f} | "
                  f"{r['model_only_img_s']:.1f} | {r['e2e_img_s'] / r['model_only_img_s']:.0%} | "
                  f"{r['data_wait_fraction']:.0%} |" if "error" not in r else
                  f"| {r['method']} ({r['pipeline']} path{e2e_decoding(r)}) | failed: {r['error'][:200]} | "
                  f"{r['model_only_img_s']:.1f} | - | - |" for r in report["e2e"]]
        if report.get("complete") is False:
            lines.append("(partial: the e2e section stopped before its last row)")
    return "\n".join(lines) + "\n"


def e2e_decoding(row: dict) -> str:
    return f", JPEG decoding: {row['jpeg_decoding']}" if row.get("jpeg_decoding") and row["pipeline"] != "reference" else ""
