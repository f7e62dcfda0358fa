#!/usr/bin/env bash
# One prepared GPU check: run it as is on one H100/H200 (under 8 minutes), then copy the table into
# benchmarks/RESULTS.md with the device and date. Writes OUT/gpu_check.json and OUT/gpu_check.md:
#   1. benchmarks/throughput.py (vit-b16: batch 256, bf16, TF32): MAE, BEiT MIM step, BEiT v2 full step,
#      eager, then (last) torch.compile'd, ours vs transformers, peak GPU memory (10 timed steps x 2 repeats);
#   2. the BEiT v2 VQ-KD tokenizer forward alone, bf16 autocast, eager;
#   3. benchmarks/data_pipeline.py: per-core host cost of each method's example (device part on the GPU),
#      with JPEGs decoded in the workers and on the GPU (the workers' part per core; nvJPEG's img/s and its
#      pixels' difference to Pillow), and end-to-end pre-training img/s from JPEG files with the real loader
#      (fast path, default workers; JPEGs decoded on the GPU, then in the workers) vs the same model on
#      synthetic batches (ViT-B/16, batch 256, bf16; tiny random tokenizer for BEiT).
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
  PAIRS=(--preset cpu-tiny --device cpu --batch_size 2 --steps 1 --warmup 0 --repeats 1)
  COMPILE=(--torch_compile_backend eager)  # dynamo tracing without code generation: seconds
  HOST=(--smoke --device cpu --methods mae,beit)
  E2E=(--smoke --device cpu --e2e_methods mae --jpeg_decodings device,host)
  LIMITS=(180 180 180 240 180 180 180)  # generous: a busy CI machine; idle, each part takes seconds
else
  PAIRS=(--preset vit-b16 --steps 10 --warmup 3 --repeats 2)
  COMPILE=()
  HOST=(--preset gpu --repeats 3 --images 64)
  # rows in this order, each written when done: a part out of time keeps the finished ones
  E2E=(--preset gpu --e2e_methods mae,beit --images 4096 --jpeg_decodings device,host)
  # seconds per part, in the order below (sum 460): the compiled pairs last, as compilation takes the
  # longest and the least predictably; a part out of time loses only its own figures
  LIMITS=(60 25 45 120 75 75 60)
fi

run_part() {  # name, limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start))s (log: $OUT/$name.log)"
}

THROUGHPUT=("$PYTHON" benchmarks/throughput.py "${PAIRS[@]}")
run_part throughput_eager "${LIMITS[0]}" "${THROUGHPUT[@]}" --models mae,beit,beitv2 --no-compile \
  --json "$OUT/throughput_eager.json"
run_part throughput_tokenizer "${LIMITS[1]}" "${THROUGHPUT[@]}" --models beitv2-tokenizer --no-compile \
  --json "$OUT/throughput_tokenizer.json"
run_part data_host "${LIMITS[2]}" "$PYTHON" benchmarks/data_pipeline.py "${HOST[@]}" --sections host \
  --json "$OUT/data_host.json"
run_part data_e2e "${LIMITS[3]}" "$PYTHON" benchmarks/data_pipeline.py "${E2E[@]}" --sections e2e \
  --json "$OUT/data_e2e.json"
for part in "mae:${LIMITS[4]}" "beit:${LIMITS[5]}" "beitv2:${LIMITS[6]}"; do
  pair=${part%%:*}
  run_part "throughput_compiled_$pair" "${part##*:}" "${THROUGHPUT[@]}" --models "$pair" --compile_only \
    ${COMPILE[@]+"${COMPILE[@]}"} --json "$OUT/throughput_compiled_$pair.json"
done
run_part token_agreement 60 "$PYTHON" benchmarks/token_agreement.py $([ "${SMOKE:-0}" = 1 ] && echo --smoke --device cpu) --json "$OUT/token_agreement.json"  # tokens equal to fp32 per --tokenizer_precision
"$PYTHON" benchmarks/gpu_check_report.py "$OUT"
