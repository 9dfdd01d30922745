"""The fused Triton mapper (stage b) against the PyTorch reference.

Runs on the GPU when there is one, else in the Triton interpreter (exact fp32 dots), so the shapes
are small. Small windows (``block_m``) make short samples span several windows.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tokenprune_kernels.mapper.functional import mapper_forward_ref
from tokenprune_kernels.testing import trained_like_mapper_params
from tokenprune_kernels.triton import mapper as triton_mapper
from tokenprune_kernels.triton import mapper_forward_triton

pytestmark = pytest.mark.interpret

EPS = 1e-4
SMALL = {"block_m": 16, "block_k": 16, "block_n": 16}


def _tol(device: str) -> dict[str, float]:
    # Interpreter: exact fp32 dots, only summation order differs. GPU: tf32x3 dots (not measured
    # here; loosened a little).
    return {"rtol": 1e-4, "atol": 1e-4} if device == "cpu" else {"rtol": 5e-4, "atol": 5e-4}


def _mapper(channels, kernel_size: int, gen: torch.Generator, device: str) -> list[torch.Tensor]:
    return trained_like_mapper_params(channels, kernel_size, gen, device)


def _inputs(lengths, gen, device, cu_dtype=torch.int64):
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(cu_dtype)
    # Attention-like: small positive values with a few peaks and exact zeros.
    attn = torch.rand(int(cu[-1]), generator=gen) ** 3 / max(1, int(cu[-1]))
    attn[torch.rand(attn.shape, generator=gen) < 0.1] = 0.0
    return attn.to(device), cu.to(device)


@pytest.mark.parametrize(
    ("channels", "kernel_size", "lengths", "blocks"),
    [
        # halo 3, tile 10: lengths 1, 2 (< halo), an empty sample, 41 over 5 windows.
        ((4, 8, 8), 3, [1, 2, 0, 41, 3], SMALL),
        # odd widths 3 -> 5 -> 7, K = 5: halo 6, tile 4; 5 < halo; 23 over 6 windows.
        ((3, 5, 7), 5, [5, 1, 0, 23, 2], SMALL),
        # one block, K = 7, widths not multiples of anything, int32 offsets below.
        ((19,), 7, [0, 9, 1, 30], {"block_m": 32, "block_k": 16, "block_n": 32}),
        # K = 1: no halo at all.
        ((6, 10), 1, [4, 0, 17], SMALL),
        # chunked channels: 40 -> 33 spans 3 input and 3 output chunks of 16.
        ((40, 33), 3, [2, 29, 1], SMALL),
    ],
)
@pytest.mark.parametrize("cu_dtype", [torch.int64, torch.int32])
def test_matches_reference(channels, kernel_size, lengths, blocks, cu_dtype, gen, device):
    params = _mapper(channels, kernel_size, gen, device)
    attn, cu = _inputs(lengths, gen, device, cu_dtype)
    expected = mapper_forward_ref(attn, cu, params, kernel_size, EPS)
    got = mapper_forward_triton(attn, cu, params, kernel_size, EPS, **blocks)
    assert got.dtype == torch.float32 and got.shape == attn.shape
    torch.testing.assert_close(got, expected, **_tol(device))


def test_default_mapper_production_tiles(gen, device):
    """The method's widths (32..512, K = 5) with the production window (128 rows, tile 108)."""
    params = _mapper((32, 64, 128, 256, 512), 5, gen, device)
    attn, cu = _inputs([131, 1, 6, 0, 2], gen, device)  # 131 crosses a window boundary
    expected = mapper_forward_ref(attn, cu, params, 5, EPS)
    got = mapper_forward_triton(attn, cu, params, 5, EPS)
    torch.testing.assert_close(got, expected, **_tol(device))


def test_persistent_programs_loop_over_windows(gen, device):
    """One program doing every window, or a few, gives the reference (and identical bits)."""
    params = _mapper((5, 9), 3, gen, device)
    attn, cu = _inputs([13, 0, 37, 1], gen, device)
    expected = mapper_forward_ref(attn, cu, params, 3, EPS)
    one = mapper_forward_triton(attn, cu, params, 3, EPS, num_programs=1, **SMALL)
    three = mapper_forward_triton(attn, cu, params, 3, EPS, num_programs=3, **SMALL)
    torch.testing.assert_close(one, expected, **_tol(device))
    assert torch.equal(one, three)


def test_no_leak_across_samples(gen, device):
    """Changing one sample's attention (even to NaN) leaves every other sample's logits alone."""
    params = _mapper((4, 6, 5), 5, gen, device)
    lengths = [7, 3, 11, 2]
    attn, cu = _inputs(lengths, gen, device)
    before = mapper_forward_triton(attn, cu, params, 5, EPS, **SMALL)
    lo, hi = int(cu[1]), int(cu[2])  # sample 1, shorter than the halo (4), between two others
    changed = attn.clone()
    changed[lo:hi] = torch.tensor([0.9, float("nan"), 0.0], device=device)
    after = mapper_forward_triton(changed, cu, params, 5, EPS, **SMALL)
    others = torch.ones_like(attn, dtype=torch.bool)
    others[lo:hi] = False
    assert torch.equal(after[others], before[others])
    assert not torch.equal(after[lo:hi].nan_to_num(), before[lo:hi])
    expected = mapper_forward_ref(changed, cu, params, 5, EPS)
    torch.testing.assert_close(after, expected, equal_nan=True, **_tol(device))


def test_empty_inputs(gen, device):
    params = _mapper((4, 8), 3, gen, device)
    for lengths in ([], [0], [0, 0, 0]):
        attn, cu = _inputs(lengths, gen, device)
        got = mapper_forward_triton(attn, cu, params, 3, EPS)
        assert got.shape == (0,) and got.dtype == torch.float32


def test_packed_params_follow_in_place_updates(gen, device):
    """The packing cache is keyed on the tensors' versions: an optimizer-style in-place update
    of a parameter is seen by the next call."""
    params = _mapper((4, 8), 3, gen, device)
    attn, cu = _inputs([9, 4], gen, device)
    first = mapper_forward_triton(attn, cu, params, 3, EPS, **SMALL)
    with torch.no_grad():
        params[2].mul_(-1.5)  # block 0 pointwise weight
    second = mapper_forward_triton(attn, cu, params, 3, EPS, **SMALL)
    assert not torch.allclose(first, second)
    expected = mapper_forward_ref(attn, cu, params, 3, EPS)
    torch.testing.assert_close(second, expected, **_tol(device))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_m": 24}, r"block_m must be a power of two >= 16, got 24"),
        ({"block_m": 8}, r"block_m must be a power of two >= 16, got 8"),
        ({"block_m": 16, "block_k": 32, "block_n": 16}, r"block_n must be a power of two >= 32"),
        ({"num_programs": 0}, r"num_programs must be an int >= 1, got 0"),
    ],
)
def test_bad_tuning_arguments(kwargs, message, gen, device):
    params = _mapper((4,), 3, gen, device)
    attn, cu = _inputs([5], gen, device)
    with pytest.raises(ValueError, match=message):
        mapper_forward_triton(attn, cu, params, 3, EPS, **kwargs)


def test_window_must_exceed_the_halo(gen, device):
    params = _mapper((4, 4, 4, 4, 4), 5, gen, device)  # halo 10
    attn, cu = _inputs([5], gen, device)
    with pytest.raises(ValueError, match=r"block_m must exceed 2 \* halo = 20 .* got 16"):
        mapper_forward_triton(attn, cu, params, 5, EPS, block_m=16)


def test_packing_is_cached_but_not_for_inference_tensors(gen, device):
    params = _mapper((4, 8), 3, gen, device)
    first = triton_mapper._pack_params(params, 3, 16, 16)
    assert triton_mapper._pack_params([p.detach() for p in params], 3, 16, 16) is first
    with torch.inference_mode():
        frozen = [p.clone() for p in params]  # no version counter: never cached
    a, b = (triton_mapper._pack_params(frozen, 3, 16, 16) for _ in range(2))
    assert a is not b and torch.equal(a.params, b.params)
    assert a.meta is b.meta  # the shape-only table is uploaded once, whatever the tensors
    attn, cu = _inputs([6, 3], gen, device)
    got = mapper_forward_triton(attn, cu, frozen, 3, EPS, **SMALL)
    torch.testing.assert_close(got, mapper_forward_ref(attn, cu, params, 3, EPS), **_tol(device))
    with torch.inference_mode():
        frozen[-1].add_(1.5)  # the head bias, in place: no version counter records it
    again = mapper_forward_triton(attn, cu, frozen, 3, EPS, **SMALL)
    torch.testing.assert_close(again, got + 1.5, **_tol(device))
