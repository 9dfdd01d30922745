"""``save_mapper`` / ``load_mapper``: safetensors + JSON round trips and every error."""

from __future__ import annotations

import json
import struct

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
