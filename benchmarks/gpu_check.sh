#!/usr/bin/env bash
# One prepared GPU check: run it as is on one H100/H200 (under 8 minutes), then copy the table into
# benchmarks/RESULTS.md with the device and date. Writes OUT/gpu_check.json and OUT/gpu_check.md:
#   1. benchmarks/throughput.py (vit-b16: batch 256, bf16, TF32): MAE, BEiT MIM step, BEiT v2 full step,
#      eager and torch.compile'd, ours vs transformers, peak GPU memory (10 timed steps x 2 repeats);
#   2. the BEiT v2 VQ-KD tokenizer forward alone, bf16 autocast, eager;
#   3. benchmarks/data_pipeline.py: per-core host cost of each method's example (device part on the GPU),
#      and end-to-end pre-training img/s from JPEG files with the real loader (fast path, default workers)
#      vs the same model on synthetic batches (ViT-B/16, batch 256, bf16; tiny random tokenizer for BEiT).
# Each part has its own time limit; a part that fails or runs out of time is reported as missing.
#
#   bash benchmarks/gpu_check.sh [OUT]          # default OUT: gpu_check
#   SMOKE=1 bash benchmarks/gpu_check.sh OUT    # CPU, tiny: checks the script end to end in about a minute
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

if [ "${SMOKE:-0}" = 1 ]; then
  PAIRS=(--preset cpu-tiny --device cpu --batch_size 2 --steps 1 --warmup 0 --repeats 1 --no-compile)
  HOST=(--smoke --device cpu --methods mae,beit)
  E2E=(--smoke --device cpu --e2e_methods mae)
  LIMITS=(60 60 60 60 60 120)
else
  PAIRS=(--preset vit-b16 --steps 10 --warmup 3 --repeats 2)
  HOST=(--preset gpu --repeats 3 --images 128)
  E2E=(--preset gpu --e2e_methods mae,beit)
  # seconds per part: mae, beit, beitv2 pairs (compilation is most of it), tokenizer, host, e2e; sum 445
  LIMITS=(95 95 80 30 45 100)
fi

run_part() {  # name, limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start))s (log: $OUT/$name.log)"
}

# One pair per process: a part that runs out of time loses only its own figures.
run_part throughput_mae "${LIMITS[0]}" "$PYTHON" benchmarks/throughput.py "${PAIRS[@]}" --models mae \
  --json "$OUT/throughput_mae.json"
run_part throughput_beit "${LIMITS[1]}" "$PYTHON" benchmarks/throughput.py "${PAIRS[@]}" --models beit \
  --json "$OUT/throughput_beit.json"
run_part throughput_beitv2 "${LIMITS[2]}" "$PYTHON" benchmarks/throughput.py "${PAIRS[@]}" --models beitv2 \
  --json "$OUT/throughput_beitv2.json"
run_part throughput_tokenizer "${LIMITS[3]}" "$PYTHON" benchmarks/throughput.py "${PAIRS[@]}" \
  --models beitv2-tokenizer --no-compile --json "$OUT/throughput_tokenizer.json"
run_part data_host "${LIMITS[4]}" "$PYTHON" benchmarks/data_pipeline.py "${HOST[@]}" --sections host \
  --json "$OUT/data_host.json"
run_part data_e2e "${LIMITS[5]}" "$PYTHON" benchmarks/data_pipeline.py "${E2E[@]}" --sections e2e \
  --json "$OUT/data_e2e.json"
"$PYTHON" benchmarks/gpu_check_report.py "$OUT"
