#!/usr/bin/env bash
# One prepared GPU check, made to work first time on a bare device machine (library device README/KINDS.md:
# `python3`, torch 2.11, transformers 5.17, an older huggingface_hub, NO datasets; at most 8 files come back
# from $OUT; 15 minutes of device time a session, start-up included). The whole check takes at most
# BUDGET seconds of parts (default 330) after a ~10 s install: about 6 minutes, room to rerun it once.
#
#   bash benchmarks/gpu_check_wheels.sh        # here, once: what the image lacks, as wheels, into .whl/ (ignored)
#   device run (carry [".whl"], timeout_s 420): bash benchmarks/gpu_check.sh $OUT
#   REHEARSE=1 bash benchmarks/gpu_check.sh OUT    # here: the same flow on the CPU, in a fresh venv that holds
#                                                  # only the image's packages (gpu_check_image.txt) + the wheels
#   SMOKE=1 bash benchmarks/gpu_check.sh OUT       # the CPU, tiny, in the current Python environment
#
# What comes back: OUT/gpu_check.md, OUT/gpu_check.json (gpu_check_report.py) and OUT/gpu_check.tar.gz (each
# part's log and JSON), rewritten after every part: a check stopped anywhere returns what finished. The parts,
# most valuable first, and what each measures: benchmarks/README.md ("The prepared GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # the parts' files; only the archive goes to OUT
trap 'rm -rf "$WORK"' EXIT  # its logs and JSON are in the archive
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
MIN_PART_S=15  # a part that would get less is skipped

if [ "${REHEARSE:-0}" = 1 ]; then  # a fresh venv of the image's packages, its own wheels, CPU sizes
  VENV=${REHEARSE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_mim/gpu_check_venv}
  bash benchmarks/gpu_check_rehearsal_venv.sh "$VENV" || { echo "gpu_check: the rehearsal venv failed"; exit 1; }
  PYTHON=$VENV/bin/python WHEELS=$VENV/wheels SMOKE=1
  export PYTHONPATH="$PWD/src"  # the venv's packages and the carried wheels, nothing else of this machine
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "${SMOKE:-0}" = 1 ]; then
  REQUIRE_CUDA=()
  PAIRS=(--preset cpu-tiny --device cpu --batch_size 2 --steps 1 --warmup 0 --repeats 1)
  COMPILE=(--torch_compile_backend eager)  # dynamo tracing without code generation: seconds
  COMPILED_PAIRS=(mae)  # the compiled path once: each part is mostly a new process's imports
  HOST=(--smoke --device cpu --methods mae,beit)
  E2E=(--smoke --device cpu --e2e_methods mae --jpeg_decodings device,host)
  FSDP=(--expect_refusal)  # no GPU: the FSDP config must be refused
  TOKENS=(--smoke --device cpu)
  LIMIT_PREFLIGHT=300 LIMIT_EAGER=180 LIMIT_TOKENIZER=180 LIMIT_HOST=180 LIMIT_E2E=240 LIMIT_COMPILED=180  # a busy CI machine
  LIMIT_FSDP=240 LIMIT_TOKENS=180
  BUDGET=${BUDGET:-3000}
else
  REQUIRE_CUDA=(--require_cuda)
  PAIRS=(--preset vit-b16 --steps 10 --warmup 3 --repeats 2)
  COMPILE=()
  COMPILED_PAIRS=(mae beit beitv2)
  HOST=(--preset gpu --repeats 3 --images 64)
  E2E=(--preset gpu --e2e_methods mae,beit --images 2048 --jpeg_decodings device,host)
  FSDP=()
  TOKENS=()
  # Seconds per part (expected: build ~5 s, 2 x 2 x 13 steps of ~0.1-0.3 s, compile ~40-60 s per pair).
  LIMIT_PREFLIGHT=60 LIMIT_EAGER=35 LIMIT_TOKENIZER=20 LIMIT_HOST=40 LIMIT_E2E=90 LIMIT_COMPILED=65
  LIMIT_FSDP=90 LIMIT_TOKENS=45  # before the compiled pairs, which take what the budget has left
  BUDGET=${BUDGET:-330}
fi

log() { echo "$*" | tee -a "$WORK/console.log"; }

pack() {  # the report and the archive as they stand (less site/, the installed wheels): what comes back now
  "$PYTHON" benchmarks/gpu_check_report.py "$WORK" "$OUT" > "$WORK/report.log" 2>&1 \
    || log "gpu_check: the report failed (see report.log in the archive)"
  tar -czf "$OUT/gpu_check.tar.gz.tmp" --exclude=./site -C "$WORK" . \
    && mv "$OUT/gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}

skip_part() {  # name, reason
  log "== $1: skipped ($2)"
  printf '%s\t0\tskipped: %s\t-1\t0\n' "$1" "$2" >> "$WORK/parts.tsv"
}

run_part() {  # name, limit (s), command...: runs it within the budget left, records how it ended
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  local left=$((BUDGET - (SECONDS - CHECK_START)))
  ((limit > left)) && limit=$left
  if ((limit < MIN_PART_S)); then
    skip_part "$name" budget
    return 1
  fi
  log "== $name (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  LAST_CODE=$?
  case $LAST_CODE in 0) status=ok ;; 124 | 137) status="out of time" ;; *) status=failed ;; esac
  log "$name: $status (exit $LAST_CODE) after $((SECONDS - start))s"
  [ "$status" = ok ] || tail -n 5 "$WORK/$name.log" | tee -a "$WORK/console.log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$limit" "$status" "$LAST_CODE" "$((SECONDS - start))" >> "$WORK/parts.tsv"
  pack
  [ "$status" = ok ]
}

# Carried wheels (what the image lacks: datasets and its dill, multiprocess) go in front of its site-packages.
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl > "$WORK/wheels.log" 2>&1 || { log "gpu_check: installing $WHEELS/*.whl failed"; cat "$WORK/wheels.log"; }
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
CHECK_START=$SECONDS
DATA=1
if ! run_part preflight "$LIMIT_PREFLIGHT" "$PYTHON" benchmarks/gpu_check_preflight.py "$WORK/preflight.json" \
  ${REQUIRE_CUDA[@]+"${REQUIRE_CUDA[@]}"}; then
  cat "$WORK/preflight.log"
  if [ "$LAST_CODE" != 3 ]; then log "gpu_check: preflight failed, nothing else run"; exit 1; fi
  log "gpu_check: the data parts cannot import (preflight's data_problems): they are skipped"
  DATA=0
fi

THROUGHPUT=("$PYTHON" benchmarks/throughput.py "${PAIRS[@]}")
for pair in mae beit beitv2; do
  run_part "throughput_eager_$pair" "$LIMIT_EAGER" "${THROUGHPUT[@]}" --models "$pair" --no-compile \
    --json "$WORK/throughput_eager_$pair.json"
done
run_part throughput_tokenizer "$LIMIT_TOKENIZER" "${THROUGHPUT[@]}" --models beitv2-tokenizer --no-compile \
  --json "$WORK/throughput_tokenizer.json"
if ((DATA)); then
  run_part data_host "$LIMIT_HOST" "$PYTHON" benchmarks/data_pipeline.py "${HOST[@]}" --sections host \
    --json "$WORK/data_host.json"
  run_part data_e2e "$LIMIT_E2E" "$PYTHON" benchmarks/data_pipeline.py "${E2E[@]}" --sections e2e \
    --json "$WORK/data_e2e.json"
else
  skip_part data_host "preflight: imports"
  skip_part data_e2e "preflight: imports"
fi
# FSDP2 through accelerate (4 steps, sharded checkpoint, resume to the same weights; on the CPU it must refuse),
# and the tokens of each --tokenizer_precision against fp32 (issue 16: targets as the papers computed them).
run_part fsdp_check "$LIMIT_FSDP" "$PYTHON" benchmarks/fsdp_check.py "$WORK" --timeout "$((LIMIT_FSDP / 2 - 5))" \
  ${FSDP[@]+"${FSDP[@]}"}
run_part token_agreement "$LIMIT_TOKENS" "$PYTHON" benchmarks/token_agreement.py ${TOKENS[@]+"${TOKENS[@]}"} \
  --json "$WORK/token_agreement.json"
for pair in "${COMPILED_PAIRS[@]}"; do
  run_part "throughput_compiled_$pair" "$LIMIT_COMPILED" "${THROUGHPUT[@]}" --models "$pair" --compile_only \
    ${COMPILE[@]+"${COMPILE[@]}"} --json "$WORK/throughput_compiled_$pair.json"
done
pack
log "gpu_check: done in $((SECONDS - CHECK_START))s of a ${BUDGET}s budget; $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/gpu_check.md"
