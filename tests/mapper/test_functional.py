"""``mapper_forward_ref`` against an independent float64 NumPy implementation, and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenprune_kernels.mapper import (
    mapper_forward_ref,
    mapper_param_names,
    validate_mapper_params,
)

DEFAULT_CHANNELS = (32, 64, 128, 256, 512)
EPS = 1e-4


def naive_mapper(attn, cu, params, kernel_size, input_eps):
    """Stage b of docs/contract.md, sample by sample, in float64 with explicit loops."""
    attn = np.asarray(attn, dtype=np.float64)
    p = [np.asarray(t.detach(), dtype=np.float64) for t in params]
    num_blocks = (len(p) - 2) // 6
    pad = kernel_size // 2
    out = []
    for b in range(len(cu) - 1):
        a = attn[cu[b] : cu[b + 1]]
        n = len(a)
        if n == 0:
            continue
        x = np.log(n * a + input_eps)[None, :]  # [1, n]
        for i in range(num_blocks):
            dw_w, dw_b, pw_w, pw_b, ln_w, ln_b = p[6 * i : 6 * i + 6]
            channels = x.shape[0]
            padded = np.zeros((channels, n + 2 * pad))
            padded[:, pad : pad + n] = x
            y = np.empty((channels, n))
            for c in range(channels):
                for t in range(n):
                    acc = dw_b[c]
                    for j in range(kernel_size):
                        acc += dw_w[c, 0, j] * padded[c, t + j]  # cross-correlation, as conv1d
                    y[c, t] = acc
            z = pw_w @ y + pw_b[:, None]  # [C_out, n]
            mean = z.mean(axis=0)
            var = ((z - mean) ** 2).mean(axis=0)
            z = (z - mean) / np.sqrt(var + 1e-5) * ln_w[:, None] + ln_b[:, None]
            x = z / (1.0 + np.exp(-z))
        head_w, head_b = p[-2], p[-1]
        out.append((head_w @ x + head_b[:, None])[0])
    return np.concatenate(out) if out else np.zeros(0)


def check_against_naive(model, lengths, cu_dtype=torch.int32, seed=0, make_attention=None):
    attn = make_attention(lengths, seed=seed)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=cu_dtype)
    params = model.op_params()
    k = model.config.kernel_size
    got = mapper_forward_ref(attn, cu, params, k, EPS)
    want = naive_mapper(attn.numpy(), cu.tolist(), params, k, EPS)
    assert got.dtype == torch.float32
    assert got.shape == (sum(lengths),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
    return got


@pytest.mark.parametrize(
    "lengths",
    [[1], [2], [3], [7], [31], [257], [5, 0, 1, 3, 0, 17], [0, 4], [6, 0], [2, 1, 2]],
    ids=str,
)
def test_tiny_channels_match_naive(make_mapper, make_attention, lengths):
    model = make_mapper((3, 4, 5), kernel_size=5, seed=len(lengths))
    check_against_naive(model, lengths, make_attention=make_attention)


@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_kernel_sizes_and_cu_dtypes(make_mapper, make_attention, kernel_size, cu_dtype):
    model = make_mapper((4, 2), kernel_size=kernel_size, seed=kernel_size)
    check_against_naive(
        model, [1, 2, 0, 9, kernel_size + 1], cu_dtype=cu_dtype, make_attention=make_attention
    )


def test_default_channels_match_naive(make_mapper, make_attention):
    model = make_mapper(DEFAULT_CHANNELS, kernel_size=5, seed=3)
    check_against_naive(model, [40, 0, 3], make_attention=make_attention)


def test_default_channels_long_sample(make_mapper, make_attention):
    # The naive loops are too slow for 512 channels x 257 tokens; vectorise only the depthwise
    # taps here (same formula) to keep the test fast.
    model = make_mapper(DEFAULT_CHANNELS, kernel_size=5, seed=4)
    attn = make_attention([257], seed=4)
    params = model.op_params()
    got = mapper_forward_ref(attn, torch.tensor([0, 257]), params, 5, EPS)

    p = [t.double().numpy() for t in params]
    x = np.log(257 * attn.double().numpy() + EPS)[None, :]
    for i in range(5):
        dw_w, dw_b, pw_w, pw_b, ln_w, ln_b = p[6 * i : 6 * i + 6]
        padded = np.pad(x, ((0, 0), (2, 2)))
        y = dw_b[:, None] + sum(dw_w[:, 0, j, None] * padded[:, j : j + 257] for j in range(5))
        z = pw_w @ y + pw_b[:, None]
        z = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) * ln_w[:, None] + ln_b[:, None]
        x = z / (1.0 + np.exp(-z))
    want = (p[-2] @ x + p[-1][:, None])[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_empty_batches(make_mapper):
    params = make_mapper().op_params()
    for cu in ([0], [0, 0], [0, 0, 0]):
        out = mapper_forward_ref(torch.zeros(0), torch.tensor(cu), params, 5, EPS)
        assert out.shape == (0,) and out.dtype == torch.float32


def test_samples_do_not_leak(make_mapper, make_attention):
    model = make_mapper(seed=7)
    lengths = [4, 1, 6]
    attn = make_attention(lengths, seed=7)
    cu = torch.tensor([0, 4, 5, 11])
    params = model.op_params()
    base = mapper_forward_ref(attn, cu, params, 5, EPS)
    changed = attn.clone()
    changed[4] = 0.9  # the one-token middle sample
    out = mapper_forward_ref(changed, cu, params, 5, EPS)
    assert torch.equal(out[:4], base[:4]) and torch.equal(out[5:], base[5:])
    assert out[4] != base[4]
    # Each sample alone gives the same logits as inside the batch.
    for s, e in ((0, 4), (4, 5), (5, 11)):
        alone = mapper_forward_ref(attn[s:e], torch.tensor([0, e - s]), params, 5, EPS)
        torch.testing.assert_close(alone, base[s:e], rtol=1e-6, atol=1e-6)


def test_input_scale_uses_sample_length(make_mapper):
    # log(n * attn + eps): a uniform signal 1/n gives the same logits for every n.
    model = make_mapper(seed=8, kernel_size=1)  # kernel 1: no edge effects, every token equal
    params = model.op_params()
    values = []
    for n in (3, 10, 40):
        out = mapper_forward_ref(torch.full((n,), 1.0 / n), torch.tensor([0, n]), params, 1, EPS)
        assert torch.allclose(out, out[0].expand(n))
        values.append(out[0].item())
    assert max(values) - min(values) < 1e-5


def test_gradients_flow(make_mapper, make_attention):
    model = make_mapper(seed=9)
    attn = make_attention([5, 2], seed=9).requires_grad_(True)
    params = model.op_params(detach=False)
    out = mapper_forward_ref(attn, torch.tensor([0, 5, 7]), params, 5, EPS)
    (out * torch.linspace(-1, 1, 7)).sum().backward()
    assert attn.grad is not None and torch.isfinite(attn.grad).all() and attn.grad.abs().sum() > 0
    for name, p in zip(mapper_param_names(3), params, strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_param_names():
    names = mapper_param_names(2)
    assert names[:6] == [
        "blocks.0.dw.weight",
        "blocks.0.dw.bias",
        "blocks.0.pw.weight",
        "blocks.0.pw.bias",
        "blocks.0.norm.weight",
        "blocks.0.norm.bias",
    ]
    assert names[6] == "blocks.1.dw.weight"
    assert names[-2:] == ["head.weight", "head.bias"]
    assert len(names) == 14 and len(set(names)) == 14
    with pytest.raises(ValueError, match="num_blocks"):
        mapper_param_names(0)


def test_validate_returns_channels(make_mapper):
    assert validate_mapper_params(make_mapper((3, 4, 5)).op_params(), 5) == (3, 4, 5)
    assert validate_mapper_params(make_mapper(DEFAULT_CHANNELS).op_params(), 5) == DEFAULT_CHANNELS


def _call(params, attn=None, cu=None, kernel_size=5, input_eps=EPS):
    attn = torch.full((4,), 0.25) if attn is None else attn
    cu = torch.tensor([0, 4]) if cu is None else cu
    return mapper_forward_ref(attn, cu, params, kernel_size, input_eps)


def test_param_errors(make_mapper):
    params = make_mapper((3, 4, 5)).op_params()

    with pytest.raises(ValueError, match=r"6 \* num_blocks \+ 2.*got 19"):
        _call(params[:-1])
    with pytest.raises(ValueError, match=r"got 0"):
        _call([])

    bad = list(params)
    bad[8] = torch.zeros(4, 2)  # blocks.1.pw.weight should be [4, 3]
    with pytest.raises(ValueError, match=r"params\[8\] \(blocks\.1\.pw\.weight\).*\[C_out, 3\]"):
        _call(bad)

    bad = list(params)
    bad[9] = torch.zeros(5)  # blocks.1.pw.bias should be [4]
    with pytest.raises(ValueError, match=r"params\[9\] \(blocks\.1\.pw\.bias\).*\[4\].*\[5\]"):
        _call(bad)

    bad = list(params)
    bad[6] = torch.zeros(4, 1, 5)  # blocks.1.dw.weight should be [3, 1, 5]
    with pytest.raises(ValueError, match=r"params\[6\] \(blocks\.1\.dw\.weight\).*\[3, 1, 5\]"):
        _call(bad)

    bad = list(params)
    bad[-2] = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"params\[18\] \(head\.weight\).*\[1, 5\]"):
        _call(bad)

    bad = list(params)
    bad[-1] = torch.zeros(())
    with pytest.raises(ValueError, match=r"params\[19\] \(head\.bias\).*\[1\]"):
        _call(bad)

    with pytest.raises(ValueError, match=r"params\[0\] \(blocks\.0\.dw\.weight\).*kernel_size=3"):
        _call(params, kernel_size=3)

    bad = list(params)
    bad[4] = bad[4].double()
    with pytest.raises(TypeError, match=r"params\[4\] \(blocks\.0\.norm\.weight\).*float32"):
        _call(bad)

    bad = list(params)
    bad[3] = [0.0, 0.0, 0.0]
    with pytest.raises(TypeError, match=r"params\[3\] \(blocks\.0\.pw\.bias\).*Tensor"):
        _call(bad)

    with pytest.raises(TypeError, match="params must be a list"):
        _call(torch.zeros(20))


def test_argument_errors(make_mapper):
    params = make_mapper().op_params()
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        _call(params, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        _call(params, kernel_size=-1)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        _call(params, kernel_size=5.0)
    for eps in (0.0, -1e-4, math.nan, math.inf):
        with pytest.raises(ValueError, match="input_eps must be a finite float > 0"):
            _call(params, input_eps=eps)
    with pytest.raises(TypeError, match="attn must be float32"):
        _call(params, attn=torch.full((4,), 0.25, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"attn must be 1-D or 2-D"):
        _call(params, attn=torch.full((1, 4, 1), 0.25))
    # [Tv, G] is a multi-channel input: this 1-channel mapper's first block does not take it
    with pytest.raises(ValueError, match=r"params\[0\] .* must have shape \[4, 1, 5\]"):
        _call(params, attn=torch.full((1, 4), 0.25))
    with pytest.raises(TypeError, match="cu_seqlens_v must be int32 or int64"):
        _call(params, cu=torch.tensor([0.0, 4.0]))
    with pytest.raises(ValueError, match="cu_seqlens_v must be 1-D"):
        _call(params, cu=torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="cu_seqlens_v must start at 0"):
        _call(params, cu=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"cu_seqlens_v must end at attn.shape\[0\] = 4"):
        _call(params, cu=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cu_seqlens_v must be non-decreasing"):
        _call(params, cu=torch.tensor([0, 3, 2, 4]))
