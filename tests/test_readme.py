"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


TEXT = README.read_text()
# `python3 -m MODULE ...` commands: inline (possibly wrapped over lines) and in bash blocks
COMMANDS = [" ".join(c.split()) for c in re.findall(r"`(python3? -m [^`]+)`", TEXT)] + [
    line.split("#")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S)
    for line in block.splitlines()
    if re.match(r"python3? -m ", line)
]


def test_readme_module_commands_name_existing_modules():
    """Every ``python3 -m MODULE`` the README quotes runs a module that exists (from the
    repository root: recipes beside the package included)."""
    import importlib.util

    modules = {c.split()[2] for c in COMMANDS}
    assert {"benchmarks.grounded.train", "tokenprune_kernels.grounded.labels_pipeline"} <= modules
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, module


def test_readme_training_command_is_the_shipped_recipe():
    """The README's training command parses with the recipe's options and gives the arguments
    the shipped log records (its output directory and the run-only options aside)."""
    import json

    from benchmarks.grounded.train import OPTIONS_SINCE_SHIPPED, parse_args
    from tokenprune_kernels.grounded.model import ASSETS_DIR

    (command,) = [c for c in COMMANDS if c.split()[2] == "benchmarks.grounded.train"]
    args = vars(parse_args(command.split()[3:]))
    logged = json.loads((ASSETS_DIR / "train_log.json").read_text())["args"]
    # options newer than the shipped run
    added = OPTIONS_SINCE_SHIPPED
    for key, value in args.items():
        if key in added:
            assert value == added[key], key
        elif key != "out":
            assert value == logged[key], key
