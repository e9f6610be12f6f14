#!/usr/bin/env bash
# Every GPU measurement of the project in one run (about 8 minutes on one GPU); appends the JSON lines, each
# with the device and date, to benchmarks/RESULTS.md under a dated heading that names the device.
#
#   benchmarks/gpu_check.sh                  # on a machine with an NVIDIA GPU (nvidia-smi names it)
#   benchmarks/gpu_check.sh --dry-run        # CPU, tiny sizes, ~1 min: checks every part runs and prints JSON
#   benchmarks/gpu_check.sh --results FILE   # append somewhere else (the dry run defaults to a temp file)
#
# Parts (each under its own time limit, so one slow part cannot eat the others' time):
#   1. OHEM-EMA at nnU-Net's real sizes (benchmarks/ohem_step.py --realistic): nnUNetPlans and
#      nnUNetResEncUNetMPlans from nnU-Net's planners for an MSSEG-II-like fingerprint (128³ patch), loader
#      CPU/wall per step for plain / augmented candidates / candidate crops, scoring per option, full steps of
#      each candidate mode with the best scoring option ($BEST_SCORING).
#   2. OHEM-EMA scoring options on tiny plans with selection recall over 200 steps of a training run.
#   3. benchmarks/precision.py --device cuda: fp32 / fp16 / bf16 x Instance / Group / BatchNorm, peak memory.
#   4. benchmarks/blob_loss_gpu.py: blob loss vs DC+CE at 128³.
set -uo pipefail

DRY=0
RESULTS=""
BEST_SCORING="${BEST_SCORING:-bf16}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --results) RESULTS="$2"; shift ;;
        --best-scoring) BEST_SCORING="$2"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
cd "$ROOT" || exit 1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOG="$WORK/log.txt"
LINES="$WORK/lines.jsonl"
: > "$LINES"
export nnUNet_compile="${nnUNet_compile:-f}" MPLBACKEND=Agg

if [ "$DRY" = 1 ]; then
    DEV=cpu
    DEVICE_NAME="cpu dry run ($(nproc) cores)"
    [ -n "$RESULTS" ] || RESULTS="$WORK/RESULTS_dry_run.md"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}"
    REALISTIC=(--case_shape 40 48 40 --real_cases 2 --plans_names nnUNetPlans --loader_steps 12 --loader_warmup 1 --repeats 1 --scoring exact ds2
               --score_repeats 1 --full_steps 1 --full_warmup 0)
    TINY=(--steps 1 --warmup 0 --recall_steps 2 --options exact ds2 --shape 34 --cases 2)
    PRECISION=(--device cpu --patch 8 --features 4 8 --steps 1 --warmup 0 --norms instance
               --precisions fp32 bf16)
    BLOB=(--device cpu --edge 16 --ks 1 10 --repeats 1)
    LIMITS=(240 120 60 60)
else
    if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > /dev/null 2>&1; then
        echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi failed); use --dry-run on a CPU machine" >&2
        exit 3
    fi
    DEV=cuda
    DEVICE_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
    [ -n "$RESULTS" ] || RESULTS="$ROOT/benchmarks/RESULTS.md"
    REALISTIC=(--plans_names nnUNetPlans nnUNetResEncUNetMPlans --loader_plans nnUNetPlans --loader_steps 4
               --repeats 2 --score_repeats 3 --full_steps 3 --full_warmup 7 --best_scoring "$BEST_SCORING")
    # tiny plans: few loader workers per trainer (eight trainers live at once)
    TINY=(--steps 10 --warmup 2 --recall_steps 200 --options exact bf16 fp16 ds2_fp16)
    PRECISION=(--device cuda)
    BLOB=(--device cuda --edge 128 --repeats 10)
    LIMITS=(300 75 75 30)
fi

FAILED=0
part() {  # part LIMIT_S NAME ARGS... : run one benchmark, keep its JSON lines
    local limit="$1" name="$2"; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)" >&2
    timeout "$limit" "$PY" "$@" > "$WORK/$name.out" 2>> "$LOG"
    local rc=$?
    grep '^{' "$WORK/$name.out" | PART="$name" "$PY" -c '
import json, os, sys
for line in sys.stdin:
    try:
        row = json.loads(line)
    except ValueError:
        continue
    row["gpu_check_part"] = os.environ["PART"]
    print(json.dumps(row))' >> "$LINES"
    echo "   rc=$rc, $((SECONDS - t0)) s, $(grep -c '^{' "$WORK/$name.out") JSON lines" >&2
    if [ "$rc" != 0 ]; then
        FAILED=1
        echo "gpu_check.sh: part $name failed (rc=$rc); last log lines:" >&2
        tail -n 20 "$LOG" >&2
    fi
}

START=$SECONDS
part "${LIMITS[0]}" realistic benchmarks/ohem_step.py --realistic --device "$DEV" "${REALISTIC[@]}"
nnUNet_n_proc_DA="${TINY_N_PROC_DA:-$([ "$DRY" = 1 ] && echo 0 || echo 4)}" \
    part "${LIMITS[1]}" tiny_options benchmarks/ohem_step.py --tiny_options --device "$DEV" "${TINY[@]}"
part "${LIMITS[2]}" precision benchmarks/precision.py "${PRECISION[@]}"
part "${LIMITS[3]}" blob_loss benchmarks/blob_loss_gpu.py "${BLOB[@]}"
TOTAL=$((SECONDS - START))

DATE="$(date -u +%Y-%m-%d)"
{
    echo ""
    echo "## GPU check (\`benchmarks/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')\`) — $DATE, $DEVICE_NAME"
    echo "$(wc -l < "$LINES") JSON lines, ${TOTAL} s in all$([ "$FAILED" = 1 ] && echo ', SOME PARTS FAILED (see the run log)')."
    DEVICE_NAME="$DEVICE_NAME" DATE="$DATE" "$PY" -c '
import json, os, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    row["device_name"], row["date"] = os.environ["DEVICE_NAME"], os.environ["DATE"]
    print("`" + json.dumps(row) + "`")' "$LINES"
} >> "$RESULTS"
echo "gpu_check.sh: $(wc -l < "$LINES") JSON lines appended to $RESULTS in ${TOTAL} s (log: $LOG)" >&2
exit "$FAILED"
