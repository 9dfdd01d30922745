"""``save_mapper`` / ``load_mapper``: safetensors + JSON round trips and every error."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenprune_kernels.mapper import (
    MapperConfig,
    TokenMapper,
    load_mapper,
    mapper_param_names,
    save_mapper,
)
from tokenprune_kernels.mapper.io import CONFIG_METADATA_KEY, config_path_for


@pytest.fixture
def saved(tmp_path, make_mapper):
    """A random (3, 4, 5) mapper with kernel 3 saved to ``tmp_path / "m.safetensors"``."""
    model = make_mapper((3, 4, 5), kernel_size=3, seed=21)
    path = tmp_path / "m.safetensors"
    save_mapper(model, path)
    return model, path


def _state(path):
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return {name: f.get_tensor(name) for name in names}, f.metadata()


def test_round_trip_identical(saved, make_attention):
    model, path = saved
    loaded = load_mapper(path)
    assert isinstance(loaded, TokenMapper) and not loaded.training
    assert loaded.config == model.config
    want = model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want) == mapper_param_names(3)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    attn = make_attention([4, 0, 9], seed=21)
    cu = torch.tensor([0, 4, 4, 13])
    assert torch.equal(loaded.forward_packed(attn, cu), model.forward_packed(attn, cu))
    padded = torch.rand(2, 9)
    lengths = torch.tensor([9, 4])
    assert torch.equal(loaded(padded, lengths), model(padded, lengths))


def test_round_trip_default_model_and_str_path(tmp_path):
    torch.manual_seed(5)
    model = TokenMapper()
    path = str(tmp_path / "default.v2.safetensors")
    save_mapper(model, path)
    assert (tmp_path / "default.v2.json").is_file()
    loaded = load_mapper(path, device=torch.device("cpu"))
    assert loaded.config == MapperConfig()
    for (name, a), (_, b) in zip(model.named_op_params(), loaded.named_op_params(), strict=True):
        assert torch.equal(a, b), name


def test_file_layout_is_safetensors_not_pickle(saved):
    model, path = saved
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80")  # pickle protocol marker
    assert not raw.startswith(b"PK")  # torch.save zip archive
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert 8 + header_len <= len(raw)
    header = json.loads(raw[8 : 8 + header_len])
    metadata = header.pop("__metadata__")
    assert set(header) == set(mapper_param_names(3))
    assert all(entry["dtype"] == "F32" for entry in header.values())
    assert header["blocks.1.pw.weight"]["shape"] == [4, 3]
    assert header["blocks.1.dw.weight"]["shape"] == [3, 1, 3]
    assert json.loads(metadata[CONFIG_METADATA_KEY]) == model.config.to_dict()
    beside = json.loads(config_path_for(path).read_text())
    assert beside == model.config.to_dict()


def test_falls_back_to_metadata_without_json(saved):
    model, path = saved
    config_path_for(path).unlink()
    loaded = load_mapper(path)
    assert loaded.config == model.config
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_json_alone_without_metadata(saved):
    model, path = saved
    tensors, _ = _state(path)
    save_file(tensors, str(path))  # no metadata
    loaded = load_mapper(path)
    assert loaded.config == model.config


def test_no_config_anywhere(saved):
    _, path = saved
    tensors, _ = _state(path)
    save_file(tensors, str(path))
    config_path_for(path).unlink()
    with pytest.raises(ValueError, match=r"no mapper config.*m\.json.*tokenprune_mapper_config"):
        load_mapper(path)


def test_config_mismatch(saved):
    _, path = saved
    json_path = config_path_for(path)
    data = json.loads(json_path.read_text())
    data["kernel_size"] = 5
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"mapper config mismatch.*m\.json"):
        load_mapper(path)


def test_bad_json(saved):
    _, path = saved
    config_path_for(path).write_text("{not json")
    with pytest.raises(ValueError, match=r"m\.json.*not valid JSON"):
        load_mapper(path)
    config_path_for(path).write_text(json.dumps({**MapperConfig().to_dict(), "extra": 1}))
    with pytest.raises(ValueError, match=r"bad mapper config in .*m\.json.*unknown.*'extra'"):
        load_mapper(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.safetensors"):
        load_mapper(tmp_path / "nothere.safetensors")


@pytest.mark.parametrize("name", ["m.pt", "m.bin", "m.safetensors.json", "m"])
def test_wrong_suffix(tmp_path, make_mapper, name):
    with pytest.raises(ValueError, match=r"must end with '\.safetensors'"):
        save_mapper(make_mapper(), tmp_path / name)
    with pytest.raises(ValueError, match=r"must end with '\.safetensors'"):
        load_mapper(tmp_path / name)


def test_save_rejects_non_mapper(tmp_path):
    with pytest.raises(TypeError, match="model must be a TokenMapper"):
        save_mapper(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")


def _rewrite(path, edit):
    tensors, metadata = _state(path)
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_missing_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("blocks.2.norm.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['blocks\.2\.norm\.bias'\]"):
        load_mapper(path)


def test_unexpected_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"blocks.3.dw.weight": torch.zeros(5, 1, 3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['blocks\.3\.dw\.weight'\]"):
        load_mapper(path)


def test_misshaped_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"head.weight": torch.zeros(1, 7)}))
    with pytest.raises(
        ValueError, match=r"mis-shaped.*head\.weight: expected \[1, 5\], got \[1, 7\]"
    ):
        load_mapper(path)


def test_wrong_dtype_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"head.bias": t["head.bias"].double()}))
    with pytest.raises(ValueError, match=r"not float32.*head\.bias: F64"):
        load_mapper(path)


def test_several_problems_listed_together(saved):
    _, path = saved

    def edit(t):
        t.pop("head.bias")
        t["bogus"] = torch.zeros(1)

    _rewrite(path, edit)
    with pytest.raises(ValueError, match=r"missing tensors \['head\.bias'\].*unexpected.*bogus"):
        load_mapper(path)


def test_corrupt_file(saved):
    _, path = saved
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(ValueError, match=r"not a valid safetensors file"):
        load_mapper(path)


_LIMITED_LOAD = """
import re, resource, sys
from tokenprune_kernels.mapper import load_mapper
status = open("/proc/self/status").read()
vm = int(re.search(r"VmSize:\\s+(\\d+) kB", status).group(1)) * 1024
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 2**20, hard))  # 512 MiB more than now
try:
    load_mapper(sys.argv[1])
except ValueError as err:
    print("ValueError:", err)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
@pytest.mark.parametrize("width", [20000, 40000])
def test_huge_config_fails_on_shapes_before_allocating(saved, width):
    """A 2 KB file whose config asks for channels [width, width] (1.6 GB / 6.4 GB of pointwise
    weights): the stored shapes are checked against the config before anything is built, so
    the load fails with the shape error naming the file even with only 512 MiB of address
    space to spare (it used to build the module first: allocator error or 1.8 GB in use)."""
    _, path = saved
    tensors, _ = _state(path)
    huge = MapperConfig(channels=(width, width), kernel_size=3)
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(huge.to_dict())})
    config_path_for(path).unlink()
    assert path.stat().st_size < 4096
    run = subprocess.run(
        [sys.executable, "-c", _LIMITED_LOAD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert out.startswith("ValueError:") and str(path) in out, out
    assert (
        "mis-shaped tensors [" in out
        and f"blocks.0.pw.weight: expected [{width}, 1], got [3, 1]" in out
    )
    assert f"blocks.1.pw.weight: expected [{width}, {width}], got [4, 3]" in out
    assert "missing tensors ['blocks.2." not in out and "unexpected tensors ['blocks.2." in out


@pytest.mark.parametrize(
    "name, value, count",
    [
        ("blocks.1.dw.weight", float("nan"), "1 NaN, 0 inf"),
        ("head.bias", float("inf"), "0 NaN, 1 inf"),
        ("blocks.0.norm.weight", float("-inf"), "0 NaN, 1 inf"),
    ],
)
def test_non_finite_weights_rejected(saved, name, value, count):
    """A mapper with a NaN or inf weight scores every token NaN (top-k would keep the first
    tokens silently): loading it fails, naming the file and the tensor."""
    _, path = saved

    def poison(t):
        t[name].view(-1)[0] = value

    _rewrite(path, poison)
    with pytest.raises(ValueError, match="non-finite") as info:
        load_mapper(path)
    assert str(path) in str(info.value)
    numel = dict(_state(path)[0])[name].numel()
    assert f"{name}: {count} of {numel}" in str(info.value)


def test_several_non_finite_tensors_listed(saved):
    _, path = saved

    def poison(t):
        t["blocks.0.pw.weight"][:] = float("nan")
        t["head.weight"][0, 1] = float("inf")

    _rewrite(path, poison)
    with pytest.raises(ValueError, match=r"blocks\.0\.pw\.weight: 3 NaN.*head\.weight: 0 NaN, 1"):
        load_mapper(path)
