"""Registers, shared memory and spills of every CUDA and Triton kernel, from ``ptxas -v`` (no GPU
needed).

    python3 benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources.md

Compiles every ``.cu`` of csrc/sources.txt alone for each arch (sm_80 and sm_90 by default) with
the flags CI uses (``-Werror all-warnings``, host ``-Wall -Wextra -Werror``) plus ``-Xptxas -v``,
and parses ptxas's report of each kernel: registers per thread, static shared memory, stack and
spill bytes. The CUB kernels that the selection instantiates are listed too.

Dynamic shared memory is chosen at launch: the instruction-attention kernels take
``2 * 64 * (pad16(D) + pad) * elem + 64 * 68 * 4 + 2048`` bytes (D the head dim), the mapper
window kernel as much as its largest window fits. The table gives both for the shipped shapes
(Qwen2-VL-7B heads, D = 128; the default mapper, widths 32..512, K = 5) on an A100 and an H100,
from the launch planners themselves (``instruction_attention_plan``, ``mapper_plan``, compiled
into a small host program with nvcc and run on the CPU).

The Triton kernels: every specialisation the host code launches
(:mod:`tokenprune_kernels.triton.lowering`: the launches recorded, their signatures, constexprs
and alignment hints as Triton's JIT derives them) lowered for sm_90, and ``ptxas -v`` run on the
PTX with the flags and the ptxas of Triton's own compile (``--ptxas`` to use another). Run it
without ``TRITON_INTERPRET=1``.

tests/csrc/test_build.py uses :func:`compile_report` to fail CI on any spill or warning, and checks
that the committed table lists every kernel; tests/triton/test_lowering.py does the same for the
Triton cases.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
NVCC_FLAGS = ["-std=c++17", "-O3", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
#: (name, SMs, opt-in shared memory per block in bytes) of the GPUs the dynamic column is for.
DEVICES = (("A100", 108, 166912), ("H100 SXM", 132, 232448))
TRITON_HEADER = "| case | warps | registers | shared B | stack B | spill st/ld B |"


@dataclass
class Kernel:
    """ptxas's report of one kernel for one arch."""

    file: str
    arch: int
    name: str  # demangled, namespaces dropped
    registers: int
    smem: int  # static shared memory, bytes
    stack: int
    spill_stores: int
    spill_loads: int


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_sources() -> list[str]:
    """The .cu files of csrc/sources.txt (paths relative to the repository root)."""
    out = []
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        kind, _, path = (part.strip() for part in line.partition(":"))
        if kind == "cuda" and path.endswith(".cu"):
            out.append(path)
    return out


_FUNCTION = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def short_name(name: str, limit: int = 90) -> str:
    """Drops namespaces, the argument list and CUB's policy boilerplate; caps the length."""
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"\b[A-Za-z_][A-Za-z_0-9]*::", "", name)
    if name.startswith("void "):
        name = name[5:]
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list "(...)" after the template arguments
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    name = name.replace("policy_hub<", "<").replace(" ", "")
    return name if len(name) <= limit else name[: limit - 4] + "...>"


def parse_ptxas(text: str, file: str, arch: int) -> list[Kernel]:
    """Every kernel of one ``nvcc -Xptxas -v`` output."""
    mangled, frames, used = [], [], []
    for line in text.splitlines():
        if m := _FUNCTION.search(line):
            mangled.append(m.group(1))
        elif m := _FRAME.search(line):
            frames.append(tuple(int(x) for x in m.groups()))
        elif (m := _USED.search(line)) and len(used) < len(mangled):
            used.append((int(m.group(1)), int(m.group(2) or 0)))
    if not (len(mangled) == len(frames) == len(used)):
        raise ValueError(f"unexpected ptxas output for {file} sm_{arch}:\n{text[-2000:]}")
    names = demangle(mangled)
    return [
        Kernel(file, arch, short_name(n), regs, smem, stack, stores, loads)
        for n, (stack, stores, loads), (regs, smem) in zip(names, frames, used, strict=True)
    ]


def compile_report(path: str, arch: int, nvcc: str | None = None) -> tuple[int, str]:
    """Compiles ``path`` alone for ``sm_<arch>`` with CI's warning flags and ``-Xptxas -v``;
    returns (return code, compiler output)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, f"-arch=sm_{arch}", *NVCC_FLAGS, "-Xptxas", "-v", "-c", str(ROOT / path)]
        cmd += ["-o", str(Path(tmp) / "k.o")]
        result = subprocess.run(cmd, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


PLAN_PROBE = r"""
#include "kernels.h"
#include <cstdio>
#include <cstdlib>
using namespace tokenprune::cuda;
int main(int argc, char** argv) {
  (void)argc;
  const int sms = std::atoi(argv[1]);
  const int smem = std::atoi(argv[2]);
  const FloatType types[2] = {FloatType::kBFloat16, FloatType::kFloat32};
  const char* names[2] = {"bf16", "fp32"};
  for (int i = 0; i < 2; ++i) {
    AttentionArgs a{};
    a.type = types[i];
    a.tq = 32; a.tk = 65536 + 51; a.tv = 65536; a.hq = 28; a.hk = 4; a.head_dim = 128; a.batch = 1;
    AttentionPlan p;
    if (instruction_attention_plan(a, sms, smem, &p) != cudaSuccess) return 1;
    std::printf("attention %s %zu %d\n", names[i], p.smem_bytes, p.fits ? 1 : 0);
  }
  MapperArgs m{};
  const int widths[6] = {1, 32, 64, 128, 256, 512};
  for (int l = 0; l < 6; ++l) m.widths[l] = widths[l];
  m.attn_groups = 1;  // the paper's [total] attention input
  m.num_blocks = 5; m.kernel_size = 5; m.total = 65536; m.batch = 1;
  MapperPlan mp;
  if (mapper_plan(m, sms, smem, &mp) != cudaSuccess) return 1;
  std::printf("mapper %zu %d %lld\n", mp.smem_bytes, mp.fits ? 1 : 0, (long long)mp.tile);
  return 0;
}
"""


def dynamic_smem(nvcc: str) -> dict[str, dict[str, str]]:
    """Device name -> {"attention bf16": "...", "attention fp32": "...", "mapper": "..."}."""
    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.cu"
        probe.write_text(PLAN_PROBE)
        exe = Path(tmp) / "probe"
        srcs = [str(ROOT / "csrc/cuda/attention.cu"), str(ROOT / "csrc/cuda/mapper.cu")]
        cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-O1", f"-I{ROOT / 'csrc/cuda'}", str(probe)]
        subprocess.run([*cmd, *srcs, "-o", str(exe)], check=True, capture_output=True, text=True)
        for name, sms, smem in DEVICES:
            lines = subprocess.run(
                [str(exe), str(sms), str(smem)], check=True, capture_output=True, text=True
            ).stdout.splitlines()
            cells: dict[str, str] = {}
            for line in lines:
                parts = line.split()
                if parts[0] == "attention":
                    cells[f"attention {parts[1]}"] = _kib(int(parts[2]), parts[3] == "1")
                else:
                    cells["mapper"] = _kib(int(parts[1]), parts[2] == "1") + f", {parts[3]} tokens"
            out[name] = cells
    return out


def _kib(n: int, fits: bool) -> str:
    return f"{n / 1024:.1f} KiB" + ("" if fits else " (does not fit)")


def table(
    kernels: list[Kernel],
    dynamic: dict[str, dict[str, str]],
    nvcc_version: str,
    head: list[str] | None = None,
) -> str:
    lines = [
        "# CUDA and Triton kernel resources (ptxas -v)",
        "",
        f"- generated on {datetime.date.today().isoformat()}",
        *(head or []),
        f"- CUDA compiler: {nvcc_version}",
        f"- flags: `{' '.join(NVCC_FLAGS)} -Xptxas -v`, each file alone",
        "- registers per thread; static shared memory (dynamic below); spills must be 0 "
        "(tests/csrc/test_build.py checks)",
        "",
        "| file | kernel | arch | registers | static smem B | stack B | spill st/ld B |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for k in sorted(kernels, key=lambda k: (k.file, k.name, k.arch)):
        lines.append(
            f"| {Path(k.file).name} | `{k.name}` | sm_{k.arch} | {k.registers} | {k.smem} | "
            f"{k.stack} | {k.spill_stores}/{k.spill_loads} |"
        )
    lines += [
        "",
        "## Dynamic shared memory per block at the shipped shapes",
        "",
        "Attention: row_stats_kernel and visual_colsum_kernel (same size), head dim 128. Mapper: "
        "mapper_window_kernel, default mapper (widths 32..512, K = 5), largest window that fits.",
        "",
        "| device (SMs, opt-in smem) | attention bf16 | attention fp32 | mapper |",
        "|---|---:|---:|---:|",
    ]
    for name, sms, smem in DEVICES:
        cells = dynamic.get(name, {})
        lines.append(
            f"| {name} ({sms}, {smem // 1024} KiB) | {cells.get('attention bf16', '-')} | "
            f"{cells.get('attention fp32', '-')} | {cells.get('mapper', '-')} |"
        )
    return "\n".join(lines)


def triton_rows(capability: int = 90, ptxas: str | None = None) -> tuple[list[dict], str]:
    """(one :func:`tokenprune_kernels.triton.lowering.lower` report per case, the ptxas used)."""
    from tokenprune_kernels.triton import lowering

    ptxas = ptxas or lowering.ptxas_path(capability)
    rows = [lowering.lower(c, capability, ptxas=ptxas) for c in lowering.all_cases(capability)]
    return rows, ptxas


def triton_table(rows: list[dict], ptxas: str, capability: int = 90) -> str:
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    version = version.strip().splitlines()[-1] if version.strip() else ptxas
    lines = [
        "",
        "## Triton kernels",
        "",
        f"Every specialisation the host functions launch (`python -m "
        f"tokenprune_kernels.triton.lowering`: signatures, constexprs and 16-byte alignment / "
        f"divisibility hints derived from the launches themselves) lowered for sm_{capability} "
        f"and reported by `ptxas -v` with Triton's flags; ptxas: {version}. Registers per "
        "thread; shared memory per program as Triton allocates it (dynamic); spills must be 0 "
        "(tests/triton/test_lowering.py checks).",
        "",
        TRITON_HEADER,
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['name']}` | {r['num_warps']} | {r['registers']} | {r['shared_bytes']} | "
            f"{r['stack']} | {r['spill_stores']}/{r['spill_loads']} |"
        )
    return "\n".join(lines) + "\n"


def header(argv: list[str]) -> list[str]:
    """Device, versions, commit and command lines, as the other results files have them."""
    import platform

    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    cpu = next(
        (line.split(":", 1)[1].strip() for line in out(["lscpu"]).splitlines()
         if line.startswith("Model name")),
        platform.processor() or "unknown",
    )  # fmt: skip
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [
        f"- device: none (compile only, no GPU involved); host CPU {cpu}",
        f"- python: {platform.python_version()}; triton: {triton_version}",
        f"- commit: {out(['git', 'rev-parse', '--short', 'HEAD']) or 'unknown'}",
        f"- command: `{' '.join(['python3', 'benchmarks/kernel_resources.py', *argv])}`",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--ptxas", help="ptxas for the Triton kernels (default: Triton's own)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        parser.error("unset TRITON_INTERPRET: the Triton kernels are lowered, not interpreted")
    nvcc = find_nvcc()
    if nvcc is None:
        parser.error("nvcc not found (set CUDA_HOME)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    version = version.strip().splitlines()[-1] if version.strip() else "nvcc"
    kernels: list[Kernel] = []
    failed = False
    for path in cuda_sources():
        for arch in args.arch:
            rc, text = compile_report(path, arch, nvcc)
            if rc != 0:
                print(f"FAIL {path} sm_{arch}:\n{text[-4000:]}", file=sys.stderr)
                failed = True
                continue
            found = parse_ptxas(text, path, arch)
            kernels += found
            spills = [k.name for k in found if k.spill_stores or k.spill_loads]
            print(f"ok   {path} sm_{arch}: {len(found)} kernels, spills: {spills or 'none'}")
    rows, ptxas = triton_rows(ptxas=args.ptxas)
    spilled = [r["name"] for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"ok   triton: {len(rows)} cases, spills: {spilled or 'none'}")
    failed |= bool(spilled)
    text = table(kernels, dynamic_smem(nvcc), version, header(argv)) + triton_table(rows, ptxas)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
