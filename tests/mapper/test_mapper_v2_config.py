"""Mapper v2's config: its input (attention channels, grid) in the file, the paper's input
still written as format version 1."""

from __future__ import annotations

import json

import pytest
import torch

from tokenprune_kernels.mapper import MapperConfig, TokenMapper, load_mapper, save_mapper


def test_paper_input_stays_format_1():
    data = MapperConfig().to_dict()
    assert data == {
        "format_version": 1, "channels": [32, 64, 128, 256, 512], "kernel_size": 5,
        "input_eps": 1e-4,
    }  # fmt: skip
    assert MapperConfig.from_dict(data) == MapperConfig()


def test_v2_round_trip(tmp_path):
    config = MapperConfig(channels=(4, 8), attention_channels=2, grid=True)
    data = config.to_dict()
    assert data["format_version"] == 2 and data["attention_channels"] == 2 and data["grid"]
    assert MapperConfig.from_dict(data) == config
    model = TokenMapper(config)
    assert model.op_params()[0].shape == (4, 1, 5)  # 2 attention + 2 grid input channels
    save_mapper(model, tmp_path / "m.safetensors")
    back = load_mapper(tmp_path / "m.safetensors")
    assert back.config == config
    for a, b in zip(back.op_params(), model.op_params(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"attention_channels": 0}, "attention_channels must be an int >= 1"),
        ({"grid": 1}, "grid must be a bool"),
    ],
)
def test_bad_v2_config(change, match):
    with pytest.raises(ValueError, match=match):
        MapperConfig(**change)


def test_v1_file_refuses_v2_keys_and_v2_needs_them(tmp_path):
    data = MapperConfig().to_dict() | {"grid": True}
    with pytest.raises(ValueError, match="unknown mapper config keys"):
        MapperConfig.from_dict(data)
    data = MapperConfig(attention_channels=2).to_dict()
    del data["grid"]
    with pytest.raises(ValueError, match="missing keys"):
        MapperConfig.from_dict(data)
    model = TokenMapper(MapperConfig(channels=(4,), attention_channels=2))
    save_mapper(model, tmp_path / "m.safetensors")
    (tmp_path / "m.json").write_text(json.dumps(MapperConfig(channels=(4,)).to_dict()))
    with pytest.raises(ValueError):
        load_mapper(tmp_path / "m.safetensors")
