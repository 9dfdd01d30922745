"""Builds the compiled extension ``tokenprune_kernels._C`` (package metadata: pyproject.toml).

Install (deps, torch included, already installed)::

    pip install --no-build-isolation -e .

``--no-build-isolation`` matters: an isolated build would download another torch (a CUDA one,
several GB) and compile against the wrong ABI.

Environment variables:

- ``TOKENPRUNE_SKIP_EXT=1``: build the pure-Python package only (the reference backend still works).
- ``FORCE_CUDA=1``: build the CUDA sources even if nvcc was not found (needs a CUDA build of torch).
  Without it, CUDA is built when torch is a CUDA build and nvcc is found via CUDA_HOME; whether a
  GPU is visible never matters.
- ``TORCH_CUDA_ARCH_LIST``: the CUDA archs, default ``8.0;8.6;8.9;9.0+PTX``.
- ``MAX_JOBS``: ninja's parallel jobs, default min(cores, memory GB / 4).
- ``TOKENPRUNE_LINEINFO=1``: compile CUDA with ``-lineinfo`` (source lines in Nsight Compute) and
  keep host debug info (otherwise ``-g0``).

The source list is csrc/sources.txt, shared with CMakeLists.txt.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def read_sources(path: Path = ROOT / "csrc" / "sources.txt") -> dict[str, list[str]]:
    """Parses csrc/sources.txt into {"cpp": [...], "cuda": [...]} (paths relative to the root)."""
    sources: dict[str, list[str]] = {"cpp": [], "cuda": []}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, sep, src = (part.strip() for part in line.partition(":"))
        if not sep or kind not in sources or not src:
            raise ValueError(
                f"{path}:{lineno}: expected 'cpp: <path>' or 'cuda: <path>', got {raw!r}"
            )
        sources[kind].append(src)
    return sources


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def default_max_jobs() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, OSError, ValueError):
        mem_gb = 4.0 * cores
    return max(1, min(cores, int(mem_gb // 4)))


def extension_modules() -> tuple[list, dict]:
    import torch
    from torch.utils import cpp_extension

    sources = read_sources()
    nvcc = None
    if cpp_extension.CUDA_HOME is not None:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else shutil.which("nvcc")
    force_cuda = env_flag("FORCE_CUDA")
    with_cuda = force_cuda or (torch.version.cuda is not None and nvcc is not None)
    if with_cuda and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
        raise RuntimeError(
            "FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (CUDA_HOME), got "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"CUDA_HOME={cpp_extension.CUDA_HOME}"
        )

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    # C++ standard: left to torch (it adds the one its headers need); our own code is C++17.
    lineinfo = env_flag("TOKENPRUNE_LINEINFO")
    # -fopenmp: at::parallel_for is inline OpenMP code in the ATen headers, serial without it.
    # -g0 drops the -g that Python's CFLAGS add (20% faster compiles) unless line info is wanted.
    cxx = ["-O3", "-fopenmp", *([] if lineinfo else ["-g0"])]
    define = []
    files = list(sources["cpp"])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        define = ["-DTOKENPRUNE_WITH_CUDA"]
        files += sources["cuda"]
    nvcc_flags = ["-O3", "-std=c++17", *define]
    if lineinfo:
        nvcc_flags.append("-lineinfo")

    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extra_compile_args = {"cxx": cxx + define}
    if with_cuda:
        extra_compile_args["nvcc"] = nvcc_flags
    ext = make(
        name="tokenprune_kernels._C",
        sources=files,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        # Only the stable Python C API is used (PyInit, no pybind11): one build per platform.
        py_limited_api=True,
    )
    print(
        f"tokenprune_kernels._C: {'CUDA' if with_cuda else 'CPU-only'} build, "
        f"{len(files)} sources, MAX_JOBS={os.environ['MAX_JOBS']}"
        + (f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""),
        file=sys.stderr,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


if env_flag("TOKENPRUNE_SKIP_EXT"):
    setup()
else:
    ext_modules, cmdclass = extension_modules()
    setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
