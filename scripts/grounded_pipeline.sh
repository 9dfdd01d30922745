#!/usr/bin/env bash
# Ship a trained grounded model and regenerate everything that depends on it:
#
#   bash scripts/grounded_pipeline.sh RUN_DIR [LABELS_DIR]
#
# RUN_DIR is the --out of `python3 -m benchmarks.grounded.train` (model/, train_log.json,
# test_predictions.json). Steps, in order, each the command the README quotes:
#   1. copy the model and its logs into tokenprune_kernels/grounded/assets;
#   2. explanation labels for 1500 training scenes (LABELS_DIR, default
#      runs/grounded_labels; relative paths are from the repository root; emptied first);
#   3. the mapper (assets/mapper.safetensors, .json, .train.json; labels summary beside it);
#   4. `tokenprune eval` on the fixed 1503-question test set of the training sizes, as two
#      shards at once (one thread each; logs in LABELS_DIR/../grounded_eval*.log), merged into
#      benchmarks/results/grounded_eval; then the large sizes (grounded_eval_large);
#   5. `tokenprune demo` (benchmarks/results/grounded_demo.png / .json).
# Labels 5 min and mapper 6 min on the 2-core CI machine; the evals' wall times are in their
# results (benchmarks/results/grounded_eval*.md). The mapper trains on two
# threads; every other step uses one, so timings in the results are single-thread CPU timings
# (taken with the other core busy).
set -euo pipefail
usage="usage: bash scripts/grounded_pipeline.sh RUN_DIR [LABELS_DIR]"
run=${1:?$usage}
labels=${2:-runs/grounded_labels}
if [[ ! -d "$run" ]]; then
    echo "grounded_pipeline: RUN_DIR $run is not a directory ($usage)" >&2
    exit 2
fi
run=$(readlink -f "$run")
cd "$(dirname "$0")/.."
assets=tokenprune_kernels/grounded/assets
results=benchmarks/results

for f in model/config.json model/model.safetensors train_log.json test_predictions.json; do
    if [[ ! -f "$run/$f" ]]; then
        echo "grounded_pipeline: RUN_DIR $run has no $f (expected the --out of python3 -m benchmarks.grounded.train)" >&2
        exit 2
    fi
done

# LABELS_DIR is emptied: refuse anything that is not a label directory (or empty / absent).
if [[ -e "$labels" && ! -f "$labels/summary.json" && -n "$(ls -A "$labels" 2>/dev/null)" ]]; then
    echo "grounded_pipeline: LABELS_DIR $labels exists and holds no summary.json; not emptying it" >&2
    exit 2
fi

step() { echo "[grounded_pipeline $(date +%H:%M:%S)] $*"; }

step "ship the model from $run"
rm -rf "$assets/model"
cp -r "$run/model" "$assets/model"
cp "$run/train_log.json" "$run/test_predictions.json" "$assets/"

step "explanation labels"
rm -rf "$labels"
python3 -m tokenprune_kernels.grounded.labels_pipeline --n 1500 --threads 1 --labels "$labels"
cp "$labels/summary.json" "$assets/mapper.labels_summary.json"

step "mapper"
python3 -m tokenprune_kernels train-mapper --labels "$labels" \
    --out "$assets/mapper.safetensors" --epochs 20 --bucket --threads 2 --no-progress

step "eval (training sizes: two shards at once, then merged; then the large sizes)"
logs=$(dirname "$labels")
pids=()
for i in 0 1; do
    python3 -m tokenprune_kernels eval --threads 1 --shard "$i/2" --out "$logs/grounded_eval_shard$i" \
        > "$logs/grounded_eval_shard$i.log" 2>&1 &
    pids+=($!)
done
for i in 0 1; do
    if ! wait "${pids[$i]}"; then
        cat "$logs/grounded_eval_shard$i.log" >&2
        echo "grounded_pipeline: eval shard $i/2 failed" >&2
        exit 1
    fi
done
python3 -m tokenprune_kernels eval --merge "$logs/grounded_eval_shard0.json" \
    "$logs/grounded_eval_shard1.json" --out "$results/grounded_eval" > "$logs/grounded_eval.log"
python3 -m tokenprune_kernels eval --sizes large --n-per-size 15 --threads 1 \
    --out "$results/grounded_eval_large" 2>&1 | tee "$logs/grounded_eval_large.log"

step "demo"
python3 -m tokenprune_kernels demo --out "$results/grounded_demo.png" \
    --json "$results/grounded_demo.json"
step "done"
