"""``MapperConfig`` and ``TokenMapper``: padded batches against the packed reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tokenprune_kernels.mapper import (
    MapperConfig,
    TokenMapper,
    mapper_forward_ref,
    mapper_param_names,
)
from tokenprune_kernels.mapper.model import CONFIG_FORMAT_VERSION

DEFAULT_CHANNELS = (32, 64, 128, 256, 512)

# ---------------------------------------------------------------------------------------------
# MapperConfig


def test_config_defaults_and_round_trip():
    config = MapperConfig()
    assert config.channels == DEFAULT_CHANNELS
    assert config.kernel_size == 5 and config.input_eps == 1e-4 and config.num_blocks == 5
    data = config.to_dict()
    assert data == {  # the paper's input: still format version 1, readable by older versions
        "format_version": 1,
        "channels": list(DEFAULT_CHANNELS),
        "kernel_size": 5,
        "input_eps": 1e-4,
    }
    assert MapperConfig.from_dict(data) == config
    custom = MapperConfig(channels=[3, 4], kernel_size=1, input_eps=1)
    assert custom.channels == (3, 4) and isinstance(custom.input_eps, float)
    assert MapperConfig.from_dict(custom.to_dict()) == custom
    assert MapperConfig(channels=(np.int64(8),)).channels == (8,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 4}, "kernel_size must be an odd int >= 1, got 4"),
        ({"kernel_size": 0}, "kernel_size must be an odd int"),
        ({"kernel_size": -3}, "kernel_size must be an odd int"),
        ({"kernel_size": 5.0}, "kernel_size must be an odd int"),
        ({"kernel_size": True}, "kernel_size must be an odd int"),
        ({"channels": ()}, "channels must hold at least one"),
        ({"channels": (32, 0)}, r"channels\[1\] must be a positive int, got 0"),
        ({"channels": (32, -4)}, r"channels\[1\] must be a positive int"),
        ({"channels": (32.0,)}, r"channels\[0\] must be a positive int"),
        ({"channels": (True,)}, r"channels\[0\] must be a positive int"),
        ({"channels": 32}, "channels must be a sequence"),
        ({"channels": "32"}, "channels must be a sequence"),
        ({"input_eps": 0.0}, "input_eps must be a finite float > 0"),
        ({"input_eps": -1e-4}, "input_eps must be a finite float > 0"),
        ({"input_eps": math.nan}, "input_eps must be a finite float > 0"),
        ({"input_eps": math.inf}, "input_eps must be a finite float > 0"),
        ({"input_eps": "1e-4"}, "input_eps must be a finite float > 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MapperConfig(**kwargs)


def test_config_from_dict_errors():
    good = MapperConfig().to_dict()
    with pytest.raises(ValueError, match=r"unknown mapper config keys \['dropout'\]"):
        MapperConfig.from_dict({**good, "dropout": 0.1})
    with pytest.raises(ValueError, match=r"unsupported mapper config format_version 3"):
        MapperConfig.from_dict({**good, "format_version": CONFIG_FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match=r"missing keys \['attention_channels', 'grid'\]"):
        MapperConfig.from_dict({**good, "format_version": CONFIG_FORMAT_VERSION})
    with pytest.raises(ValueError, match=r"unsupported mapper config format_version '1'"):
        MapperConfig.from_dict({**good, "format_version": "1"})
    with pytest.raises(ValueError, match="no 'format_version'"):
        MapperConfig.from_dict({k: v for k, v in good.items() if k != "format_version"})
    with pytest.raises(ValueError, match=r"missing keys \['kernel_size'\]"):
        MapperConfig.from_dict({k: v for k, v in good.items() if k != "kernel_size"})
    with pytest.raises(ValueError, match="'channels' must be a list"):
        MapperConfig.from_dict({**good, "channels": "32,64"})
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        MapperConfig.from_dict({**good, "kernel_size": 2})
    with pytest.raises(ValueError, match="must be a mapping"):
        MapperConfig.from_dict([("channels", [1])])


# ---------------------------------------------------------------------------------------------
# TokenMapper parameters


def test_parameters_map_one_to_one_to_op_params():
    model = TokenMapper()
    names = mapper_param_names(5)
    assert list(model.state_dict()) == names
    assert [n for n, _ in model.named_parameters()] == names
    params = model.op_params()
    shapes = [tuple(p.shape) for p in params]
    widths = (1, *DEFAULT_CHANNELS)
    want = []
    for c_in, c_out in itertools.pairwise(widths):
        want += [(c_in, 1, 5), (c_in,), (c_out, c_in), (c_out,), (c_out,), (c_out,)]
    want += [(1, 512), (1,)]
    assert shapes == want
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in params)
    assert not any(p.requires_grad for p in params)
    for p, (_, live) in zip(params, model.named_parameters(), strict=True):
        assert p.data_ptr() == live.data_ptr()  # detached views, no copies
    assert all(p.requires_grad for p in model.op_params(detach=False))


def test_default_init_gives_nonconstant_logits():
    torch.manual_seed(0)
    model = TokenMapper()
    out = model(torch.rand(2, 20))
    assert torch.isfinite(out).all() and out.std() > 0


def test_config_type_checked():
    with pytest.raises(TypeError, match="config must be a MapperConfig"):
        TokenMapper({"channels": [4]})


# ---------------------------------------------------------------------------------------------
# Padded forward against the packed reference


def _padded(lengths, width, seed, make_attention, fill=0.0):
    packed = make_attention(lengths, seed=seed)
    attn = torch.full((len(lengths), width), fill)
    cu = [0, *np.cumsum(lengths).tolist()]
    for b, n in enumerate(lengths):
        attn[b, :n] = packed[cu[b] : cu[b + 1]]
    return attn, torch.tensor(lengths), packed, torch.tensor(cu)


@pytest.mark.parametrize(
    ("channels", "kernel_size", "lengths", "width"),
    [
        ((3, 4, 5), 5, [1, 2, 3, 7, 0, 31], 31),
        ((3, 4, 5), 5, [8, 8], 8),
        ((3, 4, 5), 7, [1, 6, 2, 0], 9),
        ((4,), 1, [3, 5], 6),
        (DEFAULT_CHANNELS, 5, [64, 1, 17, 0, 3], 64),
    ],
)
def test_padded_matches_reference(
    make_mapper, make_attention, channels, kernel_size, lengths, width
):
    model = make_mapper(channels, kernel_size=kernel_size, seed=width)
    attn, lens, packed, cu = _padded(lengths, width, width, make_attention)
    out = model(attn, lens)
    assert out.shape == (len(lengths), width) and out.dtype == torch.float32
    ref = mapper_forward_ref(packed, cu, model.op_params(), kernel_size, model.config.input_eps)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], ref[cu[b] : cu[b + 1]], rtol=1e-5, atol=1e-5)
        assert torch.equal(out[b, n:], torch.zeros(width - n))
    torch.testing.assert_close(model.forward_packed(packed, cu), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fill", [0.0, 0.7, -3.0, 1e30, math.inf, -math.inf, math.nan])
def test_padding_values_do_not_matter(make_mapper, make_attention, fill):
    model = make_mapper((3, 4, 5), seed=11)
    lengths = [5, 1, 2, 9]
    clean, lens, _, _ = _padded(lengths, 12, 11, make_attention, fill=0.0)
    dirty, _, _, _ = _padded(lengths, 12, 11, make_attention, fill=fill)
    assert torch.equal(model(dirty, lens), model(clean, lens))


def test_padding_does_not_leak_into_gradients(make_mapper, make_attention):
    model = make_mapper((3, 4, 5), seed=12)
    lengths = [5, 1, 9]
    grads = []
    for fill in (0.0, math.nan):
        attn, lens, _, _ = _padded(lengths, 10, 12, make_attention, fill=fill)
        attn.requires_grad_(True)
        model.zero_grad()
        out = model(attn, lens)
        (out.sin() * (out != 0)).sum().backward()
        assert torch.equal(attn.grad[0, 5:], torch.zeros(5))
        assert torch.isfinite(attn.grad).all() or math.isnan(fill)
        grads.append([p.grad.clone() for p in model.parameters()])
    for clean, dirty in zip(*grads, strict=True):
        assert torch.equal(clean, dirty)


def test_lengths_none_means_full(make_mapper, make_attention):
    model = make_mapper(seed=13)
    attn, _, _, _ = _padded([6, 6], 6, 13, make_attention)
    assert torch.equal(model(attn), model(attn, torch.tensor([6, 6])))
    assert torch.equal(model(attn), model(attn, torch.tensor([6, 6], dtype=torch.int32)))


def test_empty_shapes(make_mapper):
    model = make_mapper()
    assert model(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0, 5)
    assert model(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long)).shape == (2, 0)
    out = model(torch.rand(2, 4), torch.tensor([0, 0]))
    assert torch.equal(out, torch.zeros(2, 4))


def test_training_step_kl(make_mapper, make_attention):
    # The method's loss: KL(target || softmax(logits)) over each sample's valid tokens.
    model = make_mapper(DEFAULT_CHANNELS, seed=14)
    lengths = [7, 3]
    attn, lens, _, _ = _padded(lengths, 7, 14, make_attention)
    valid = torch.arange(7) < lens[:, None]
    target = torch.rand(2, 7) * valid
    target = target / target.sum(1, keepdim=True)
    logits = model(attn, lens).masked_fill(~valid, -math.inf)
    log_p = torch.log_softmax(logits, dim=1).masked_fill(~valid, 0.0)
    loss = torch.nn.functional.kl_div(log_p, target, reduction="batchmean")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_forward_errors(make_mapper):
    model = make_mapper()
    with pytest.raises(TypeError, match="attn must be float32"):
        model(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"attn must be 2-D \[B, N\]"):
        model(torch.zeros(4))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        model(torch.zeros(2, 4), torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="lengths must be a Tensor"):
        model(torch.zeros(2, 4), [1, 2])
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \[2\]"):
        model(torch.zeros(2, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, N\] = \[0, 4\]"):
        model(torch.zeros(2, 4), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, N\]"):
        model(torch.zeros(2, 4), torch.tensor([-1, 2]))
