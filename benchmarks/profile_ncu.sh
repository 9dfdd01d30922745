#!/usr/bin/env bash
# Profile the kernels of one warmed-up prune_and_merge call with Nsight Compute.
#
#   benchmarks/profile_ncu.sh [N_v=16384] [keep=0.5] [out=benchmarks/results/ncu_<N_v>]
#   ncu --import benchmarks/results/ncu_16384.ncu-rep --page details   # read it back
#
# Only the kernels inside the NVTX range "tokenprune.profile" are profiled (the warm-up calls that
# JIT-compile and autotune run outside it). Extra arguments after the third go to
# profile_target.py (e.g. --no-mapper). Needs a CUDA GPU and ncu on PATH.
set -euo pipefail
n_visual="${1:-16384}"
keep="${2:-0.5}"
out="${3:-benchmarks/results/ncu_${n_visual}}"
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
ncu --nvtx --nvtx-include "tokenprune.profile/" --set full --target-processes all \
    --force-overwrite --export "$out" \
    python3 benchmarks/profile_target.py --n-visual "$n_visual" --keep "$keep" "$@"
ncu --import "$out.ncu-rep" --print-summary per-kernel
