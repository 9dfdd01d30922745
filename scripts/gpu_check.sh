#!/usr/bin/env bash
# Where every kernel stands on a GPU machine, in one command and at most 8 minutes:
#
#   scripts/gpu_check.sh OUT_DIR             # a machine with an NVIDIA GPU, a CUDA torch, nvcc
#   scripts/gpu_check.sh --dry-run OUT_DIR   # any machine: every step in a mode without a GPU
#
# Needs no package registry (nothing is installed): python3 with torch, triton and transformers,
# nvcc, and ncu for the profile step. Steps, each bounded by `timeout` (seconds in brackets, 470 in
# all), each writing its log and results into OUT_DIR:
#   1. env      [15]  GPU, driver, versions, the backend table              env.log
#   2. build    [120] the extension in place, for this GPU's arch only      build.log
#   3. tests    [150] CUDA tests (tests/csrc, tests/ops: every dtype, bf16 included; the
#                     backend parity tests of tests/ops/test_attention.py on the cuda backend,
#                     marked cuda by backend_params) [90] and the Triton tests on the GPU [60]
#                                                                           tests_cuda.log, tests_triton.log
#   4. parity   [35]  CUDA vs Triton vs reference, every stage and dtype    parity.md/.json
#   5. bench    [45]  per-kernel times against their floors                 bench_kernels.md
#   6. e2e      [45]  Qwen2-VL-7B-shaped prefill, unpruned vs 50% vs 25%    e2e.md
#   7. ncu      [60]  Nsight Compute on the attention and mapper kernels at N_v 64k, both
#                     backends [30 each]: time, L2 and DRAM bytes           ncu_cuda.csv, ncu_triton.csv
# A step that fails or times out is recorded and the run goes on; summary.md lists every step's
# status and time, and the exit status is 1 if any step failed. --dry-run runs each step's CPU
# form (one .cu compiled, tests collected, the parity harness on the CPU, the benches' argument
# parsing and smoke modes) and prints the GPU command it stands for, with 4x the time limits (a
# CPU-only CI machine is slow); CI runs it (tests/test_gpu_check.py).
set -uo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--dry-run] OUT_DIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
# The checkout's package (built in place below), not whichever one is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
root=$(pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
summary="$out/summary.md"
failed=0
{
  echo "# gpu_check $( ((dry)) && echo '(dry run, no GPU)')"
  echo
  echo "- started: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---:|---|"
} > "$summary"

# step NAME SECONDS LOG CMD...: runs CMD under `timeout`, logs its output, records the result.
step() {
  local name=$1 limit=$(($2 * (dry ? 4 : 1))) log=$3
  shift 3
  local start=$SECONDS status rc
  echo "== $name (limit ${limit}s): $*" | tee "$out/$log"
  # bash -c: CMD may be one of the exported functions below
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >> "$out/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT (${limit}s)"; failed=1 ;;
    *) status="FAIL (exit $rc)"; failed=1 ;;
  esac
  echo "== $name: $status in $((SECONDS - start)) s" | tee -a "$out/$log"
  echo "| $name | $status | $((SECONDS - start)) | $log |" >> "$summary"
}

# The GPU commands (printed in the dry run, which runs their CPU forms instead).
cuda_tests=(-m pytest -q -rs tests/csrc tests/ops/test_attention.py tests/ops/test_syncs.py
            tests/ops/test_opcheck.py -m cuda)
triton_tests=(-m pytest -q -rs tests/triton)
parity=(benchmarks/parity.py --out "$out/parity.md")
bench=(benchmarks/bench_triton.py --impls cuda triton eager --n-visual 4096 65536 --sets 2
       --max-eager 4096 --stages attention mapper select merge composite
       --out "$out/bench_kernels.md")
e2e=(benchmarks/bench_e2e.py --device cuda --config 7b --family qwen2_vl --visual-tokens 4096
     --repeats 3 --warmup 1 --out "$out/e2e.md")
ncu_metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum
ncu_kernels='regex:row_stats|colsum|mapper'

export py out ncu_metrics ncu_kernels
export parity_cmd="${parity[*]}"

# 1. environment
env_py='
import torch, tokenprune_kernels as tp
from tokenprune_kernels import _extension, backend
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
print("extension:", _extension.path() or _extension.load_error())
dev = "cuda" if torch.cuda.is_available() else "cpu"
for op, which in backend.describe(dev).items():
    print(f"  {op}: {which}")
'
env_cmd() {
  (command -v nvidia-smi > /dev/null && nvidia-smi) || echo "nvidia-smi: not found"
  (command -v nvcc > /dev/null && nvcc --version | tail -2) || echo "nvcc: not found"
  (command -v ncu > /dev/null && ncu --version | tail -1) || echo "ncu: not found"
  "$py" -c "$env_py"
}
export env_py
export -f env_cmd
step env 15 env.log env_cmd

# 2. build, for this GPU's arch only (TORCH_CUDA_ARCH_LIST from the device)
build_cmd() {
  local arch
  arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" FORCE_CUDA=1 \
    "$py" setup.py build_ext --inplace
  "$py" -c 'import torch, tokenprune_kernels._C
assert torch._C._dispatch_has_kernel_for_dispatch_key("tokenprune::_select_topk", "CUDA")
print("CUDA kernels registered")'
}
build_dry() {
  echo "GPU command: TORCH_CUDA_ARCH_LIST=<this GPU> MAX_JOBS=$(nproc) FORCE_CUDA=1 $py setup.py build_ext --inplace"
  local nvcc
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  "$nvcc" -arch=sm_90 -std=c++17 -O3 -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
    -c csrc/cuda/gather.cu -o "$out/gather.o" && echo "nvcc: csrc/cuda/gather.cu compiles for sm_90"
}
export -f build_cmd build_dry
if ((dry)); then step build 120 build.log build_dry; else step build 120 build.log build_cmd; fi

# 3. tests
if ((dry)); then
  step tests_cuda 90 tests_cuda.log "$py" "${cuda_tests[@]/-rs/--collect-only}"
  step tests_triton 60 tests_triton.log "$py" -m pytest -q --collect-only tests/triton
else
  step tests_cuda 90 tests_cuda.log "$py" "${cuda_tests[@]}"
  step tests_triton 60 tests_triton.log "$py" "${triton_tests[@]}"
fi

# 4. parity
parity_dry() {
  echo "GPU command: $py $parity_cmd"
  "$py" benchmarks/parity.py --device cpu --smoke --dtypes float32 bfloat16 --out "$out/parity.md"
}
export -f parity_dry
if ((dry)); then
  step parity 35 parity.log parity_dry
else
  step parity 35 parity.log "$py" "${parity[@]}"
fi

# 5. per-kernel benchmark (the dry run: the same options in --smoke mode, reference only)
if ((dry)); then
  step bench 45 bench.log "$py" benchmarks/bench_triton.py --impls eager --n-visual 4096 65536 \
    --sets 2 --max-eager 4096 --stages attention mapper select merge composite --smoke \
    --out "$out/bench_kernels.md"
else
  step bench 45 bench.log "$py" "${bench[@]}"
fi

# 6. end to end (the dry run parses the GPU command line)
parse_e2e() {
  "$py" - "$@" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bench_e2e", "benchmarks/bench_e2e.py")
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
print("bench_e2e arguments:", vars(module.parse_args(sys.argv[1:])))
EOF
}
export -f parse_e2e
if ((dry)); then
  step e2e 45 e2e.log parse_e2e "${e2e[@]:1}"
else
  step e2e 45 e2e.log "$py" "${e2e[@]}"
fi

# 7. Nsight Compute: attention and mapper kernels of one prune_and_merge call at N_v 64k
ncu_cmd() {
  local backend=$1
  ncu --nvtx --nvtx-include "tokenprune.profile/" --kernel-name "$ncu_kernels" \
    --metrics "$ncu_metrics" --csv --target-processes all \
    "$py" benchmarks/profile_target.py --n-visual 65536 --keep 0.5 --backend "$backend" \
    > "$out/ncu_$backend.csv"
  tail -n +1 "$out/ncu_$backend.csv" | grep -E 'Kernel Name|row_stats|colsum|mapper' | head -40
}
ncu_dry() {
  echo "GPU command: ncu --nvtx --nvtx-include tokenprune.profile/ --kernel-name '$ncu_kernels'" \
    "--metrics $ncu_metrics --csv $py benchmarks/profile_target.py --n-visual 65536 --backend cuda|triton"
  (command -v ncu > /dev/null && echo "ncu found") || echo "ncu: not found (needed on the GPU machine)"
  "$py" benchmarks/profile_target.py --help
}
export -f ncu_cmd ncu_dry
if ((dry)); then
  step ncu 60 ncu.log ncu_dry
else
  step ncu_cuda 30 ncu_cuda.log ncu_cmd cuda
  step ncu_triton 30 ncu_triton.log ncu_cmd triton
fi

echo >> "$summary"
echo "- finished: $(date -u +%Y-%m-%dT%H:%M:%SZ), total $SECONDS s" >> "$summary"
cat "$summary"
exit $failed
