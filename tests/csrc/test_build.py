"""Build checks that need no GPU: the shared source list, the torch-free CUDA kernels compiled by
nvcc for sm_80 and sm_90 (no warning, no spill), the CUDA glue type-checked against torch's
headers, and (slow) the CMake build."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES_TXT = ROOT / "csrc" / "sources.txt"
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2|pybind11)/', re.M)
LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
RESOURCES_TABLE = ROOT / "benchmarks" / "results" / "kernel_resources.md"


def read_sources() -> dict[str, list[str]]:
    """csrc/sources.txt as {"cpp": [...], "cuda": [...]} (same format setup.py and CMake read)."""
    sources: dict[str, list[str]] = {"cpp": [], "cuda": []}
    for raw in SOURCES_TXT.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            kind, _, path = (part.strip() for part in line.partition(":"))
            sources[kind].append(path)
    return sources


CUDA_KERNELS = [p for p in read_sources()["cuda"] if p.endswith(".cu")]


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir() -> Path | None:
    nvcc = find_nvcc()
    candidates = [Path(nvcc).resolve().parents[1] / "include"] if nvcc else []
    candidates.append(Path("/usr/local/cuda/include"))
    return next((d for d in candidates if (d / "cuda_runtime_api.h").exists()), None)


def local_closure(path: Path) -> list[Path]:
    """The file and every header it includes with quotes, recursively."""
    seen, todo = [], [path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += [(p.parent / inc).resolve() for inc in LOCAL_INCLUDE.findall(p.read_text())]
    return seen


def test_source_list_matches_the_tree():
    sources = read_sources()
    listed = sources["cpp"] + sources["cuda"]
    assert len(listed) == len(set(listed)), "a source is listed twice"
    for path in listed:
        assert (ROOT / path).is_file(), f"csrc/sources.txt lists a missing file: {path}"
    on_disk = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in (".cpp", ".cu", ".cc")
    }
    assert set(listed) == on_disk, "every csrc source must be in csrc/sources.txt"
    assert "csrc/torch_bindings.cpp" in sources["cpp"]
    assert all(p.startswith("csrc/cuda/") for p in sources["cuda"])
    assert not any(p.startswith("csrc/cuda/") for p in sources["cpp"])


@pytest.mark.parametrize("path", CUDA_KERNELS)
def test_cuda_kernels_are_torch_free(path):
    for file in local_closure(ROOT / path):
        match = TORCH_INCLUDE.search(file.read_text())
        assert match is None, f"{file.relative_to(ROOT)} includes {match.group(0).strip()}"


def _resources():
    """benchmarks/kernel_resources.py as a module (its compile and ptxas parser); benchmarks/ is
    importable from the repository root (pytest's pythonpath)."""
    return importlib.import_module("benchmarks.kernel_resources")


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("path", CUDA_KERNELS)
def test_cuda_kernels_compile_without_warnings_or_spills(path, arch):
    """Each .cu alone, for sm_80 and sm_90, -Werror on every warning (nvcc's and the host
    compiler's -Wall -Wextra); ptxas -v reports no spill and no stack in any kernel, CUB's
    included; the committed table benchmarks/results/kernel_resources.md lists every kernel."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    res = _resources()
    rc, text = res.compile_report(path, arch, nvcc)
    assert rc == 0, text[-6000:]
    kernels = res.parse_ptxas(text, path, arch)
    assert kernels, f"ptxas reported no kernel for {path}"
    spilled = [(k.name, k.stack, k.spill_stores, k.spill_loads) for k in kernels
               if k.stack or k.spill_stores or k.spill_loads]  # fmt: skip
    assert not spilled, f"{path} sm_{arch}: stack/spills in {spilled}"
    listed = RESOURCES_TABLE.read_text()
    name = Path(path).name
    missing = [k.name for k in kernels if f"| {name} | `{k.name}` | sm_{arch} |" not in listed]
    assert not missing, (
        f"{RESOURCES_TABLE.relative_to(ROOT)} lacks {missing}: regenerate it with "
        "python3 benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources.md"
    )


def test_ptxas_parser_reads_registers_smem_and_spills():
    res = _resources()
    text = textwrap.dedent(
        """
        ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
        ptxas info    : Function properties for _Z3fooPf
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
        ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
        ptxas info    : Function properties for _Z3barv
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 4 registers, used 0 barriers
        """
    )
    foo, bar = res.parse_ptxas(text, "x.cu", 90)
    assert (foo.registers, foo.smem, foo.stack, foo.spill_stores, foo.spill_loads) == (
        40, 128, 8, 4, 12)  # fmt: skip
    assert foo.name.startswith("foo")
    assert (bar.registers, bar.smem, bar.spill_stores) == (4, 0, 0)
    with pytest.raises(ValueError, match="unexpected ptxas output"):
        res.parse_ptxas("ptxas info    : Function properties for _Z3fooPf\n", "x.cu", 90)


CORE_HEADERS = sorted(p.name for p in (ROOT / "csrc" / "core").glob("*.h"))

# Every function of csrc/core called from a kernel: the CPU kernels' shared arithmetic must
# compile as device code for the CUDA kernels that include it.
CORE_KERNEL = """
#include "softmax.h"
#include "mapper_block.h"
#include "order_key.h"
#include "spread.h"
using namespace tokenprune::core;
__global__ void core_kernel(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float m = 0.0f, r = 0.0f;
  bias_norm_moments(x, x, n, &m, &r);
  norm_silu_row(x, n, m, r, x, x);
  float v = exp2_f32(x[i]) + silu_f32(x[i]) + dot_fixed(x, x, n);
  v += softmax_tile_value(x[i], softmax_shift(m), 0.5f) + softmax_rescaled_sum(m, r, 1.0f);
  v += softmax_tile_weight(m, 1.0f, 2.0f) + mapper_input(x[i], 3.0f, 1e-4f);
  v += norm_silu_head(x, n, m, r, x, x, x, 1.0f) + bits_float(float_bits(kNegInf));
  x[i] = v + norm_silu(x[i], m, r, 1.0f, 0.0f);
}
__global__ void spread_core_kernel(const int64_t* xy, int64_t n, uint64_t* out) {
  const int64_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint64_t acc = spread_rank_key(order_key(static_cast<float>(i)), i);
  spread_neighbours(xy, n, i, 2, [&](int64_t j) { acc += static_cast<uint64_t>(j); });
  out[i] = acc + (spread_is_neighbour(xy, i, 0, 1) ? 1u : 0u);
}
"""


@pytest.mark.parametrize("name", CORE_HEADERS)
def test_core_headers_are_torch_free(name):
    for file in local_closure(ROOT / "csrc" / "core" / name):
        match = TORCH_INCLUDE.search(file.read_text())
        assert match is None, f"{file.relative_to(ROOT)} includes {match.group(0).strip()}"


def test_core_headers_compile_as_device_code(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    source = tmp_path / "core_kernel.cu"
    source.write_text(CORE_KERNEL)
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-O3", "-Werror", "all-warnings"]
    cmd += ["-Xcompiler", "-Wall,-Wextra,-Werror", f"-I{ROOT / 'csrc' / 'core'}"]
    cmd += ["-c", str(source), "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cuda_glue_type_checks(tmp_path):
    """The ATen glue of the CUDA build, checked with -fsyntax-only against this torch's headers
    (a CPU-only torch ships c10/cuda headers but not the generated cuda_cmake_macros.h: a stub
    stands in for it, found only when the real one is absent)."""
    import torch.utils.cpp_extension as ext

    cuda_inc = cuda_include_dir()
    cxx = shutil.which("c++") or shutil.which("g++")
    if cuda_inc is None or cxx is None:
        pytest.skip("needs the CUDA headers and a C++ compiler")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    glue = [p for p in read_sources()["cuda"] if not p.endswith(".cu")]
    assert glue, "expected the CUDA glue in csrc/sources.txt"
    includes = [f"-I{d}" for d in ext.include_paths()]
    for path in glue:
        cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTOKENPRUNE_WITH_CUDA", *includes]
        cmd += [f"-I{cuda_inc}", "-idirafter", str(tmp_path / "stub"), str(ROOT / path)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_cmake_builds_the_extension(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    import torch

    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    configure += [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    configure += [f"-DPython3_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, [cmake, "--build", str(build), "-j", "2"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    (lib,) = build.glob("_C*.so")
    # A fresh interpreter: the installed extension registers the same library name.
    check = textwrap.dedent(
        f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        kept, cu = torch.ops.tokenprune._select_topk(
            torch.tensor([1.0, 3.0, float("nan"), 3.0]), torch.tensor([0, 4]), torch.tensor([2]))
        assert kept.tolist() == [1, 3] and cu.tolist() == [0, 2], (kept, cu)
        """
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
