"""Inputs and comparisons shared by the compiled-kernel tests (test_cpu_kernels.py and
test_cuda_kernels.py): the dtypes, the bit-exact comparison, offsets, keep counts, the
_select_topk scores and layouts, and the _merge_kept layouts and inputs. Imported by name
(pytest puts this folder on sys.path)."""

from __future__ import annotations

import math

import torch

from tokenprune_kernels.reference import select_topk_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ops():
    return torch.ops.tokenprune


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN payloads and -0.0 included); both on one device."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype in _BITS:
        got, want = got.view(_BITS[want.dtype]), want.view(_BITS[want.dtype])
    assert torch.equal(got, want)


def offsets(counts: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    return torch.tensor(cu, dtype=dtype)


def make_counts(lengths: list[int], mode: str, g: torch.Generator) -> torch.Tensor:
    counts = []
    for b, n in enumerate(lengths):
        if mode == "random":
            counts.append(int(torch.randint(0, n + 1, (1,), generator=g)))
        else:  # cycle through the edges: 1, n, n - 1, n // 2 (never above n, 0 when n == 0)
            choice = [1, n, n - 1, n // 2][b % 4]
            counts.append(max(0, min(n, choice)))
    return torch.tensor(counts, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# _select_topk


def make_scores(n: int, dtype: torch.dtype, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(n, generator=g).to(dtype)
    if kind == "ties":  # five distinct values, many equal, -0.0 and +0.0 both present
        x = torch.randint(-2, 3, (n,), generator=g).float() * 0.5
        zeros = x == 0
        sign = torch.randint(0, 2, (n,), generator=g).bool()
        return torch.where(zeros & sign, torch.tensor(-0.0), x).to(dtype)
    if kind == "special":  # NaN, +-inf, +-0.0 planted among normal values
        x = torch.randn(n, generator=g)
        pick = torch.randint(0, 10, (n,), generator=g)
        for code, value in enumerate([math.nan, math.inf, -math.inf, -0.0, 0.0]):
            x = torch.where(pick == code, torch.tensor(value), x)
        return x.to(dtype)
    if kind == "bits":  # uniformly random bit patterns: every exponent, subnormals, NaN payloads
        if dtype == torch.float32:
            raw = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64)
            return raw.to(torch.int32).view(torch.float32)
        raw = torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int64)
        return raw.to(torch.int16).view(dtype)
    if kind == "constant":  # all ties: the lowest indices win
        sign = torch.randint(0, 2, (n,), generator=g).bool()
        return torch.where(sign, torch.tensor(-0.0), torch.tensor(0.0)).to(dtype)
    if kind == "nan":  # mostly NaN, a few numbers
        x = torch.full((n,), math.nan)
        few = torch.randint(0, 8, (n,), generator=g) == 0
        return torch.where(few, torch.randn(n, generator=g), x).to(dtype)
    raise ValueError(kind)


SELECT_LAYOUTS = {
    "n1": [1],
    "n2": [2],
    "n3": [3],
    "n13": [13],
    "n257": [257],
    "n4099": [4099],
    "ragged": [5, 0, 17, 1, 4099, 2, 31],
    "zeros": [0, 7, 0],
    "empty": [0],
    "large": [20011],  # above the split threshold: histograms and compaction per chunk
    "large_ragged": [16384, 3, 0, 17389],
}
SCORE_KINDS = ["normal", "ties", "special", "bits", "constant", "nan"]


# --------------------------------------------------------------------------------------------
# _merge_kept

MERGE_LAYOUTS = {  # (full length, visual tokens) per sample
    "one_visual": [(1, 1)],
    "one_text": [(1, 0)],
    "all_visual": [(5, 5)],
    "small": [(40, 13)],
    "large": [(5000, 4099)],
    "ragged": [(10, 3), (0, 0), (7, 0), (300, 257), (6, 6), (1, 0), (2, 1)],
}
MERGE_MODES = ["random", "none", "all"]  # how many visual tokens kept_for keeps


def make_merge_inputs(layout, dtype, hidden, rows, cu_dtype, vidx_dtype, g) -> dict:
    """The arguments of _merge_kept but kept_idx, on the CPU."""
    lengths = [n for n, _ in layout]
    nvis = [v for _, v in layout]
    visual_idx = []
    for n, nv in layout:
        visual_idx += sorted(torch.randperm(n, generator=g)[:nv].tolist())
    tl, tv = sum(lengths), sum(nvis)
    return dict(
        inputs_embeds=torch.randn(tl, hidden, generator=g).to(dtype),
        position_ids=torch.randint(-5, 10**5, (rows, tl), generator=g).to(vidx_dtype),
        cu_seqlens=offsets(lengths, cu_dtype),
        visual_embeds=torch.randn(tv, hidden, generator=g).to(dtype),
        visual_idx=torch.tensor(visual_idx, dtype=vidx_dtype),
        cu_seqlens_v=offsets(nvis, cu_dtype),
    )


def kept_for(args: dict, mode: str, g: torch.Generator) -> torch.Tensor:
    """A valid kept_idx for `args`: none, all or a random number of each sample's visual tokens."""
    cu_v = args["cu_seqlens_v"]
    lengths = (cu_v[1:] - cu_v[:-1]).tolist()
    if mode == "none":
        counts = torch.zeros(len(lengths), dtype=torch.int64)
    elif mode == "all":
        counts = torch.tensor(lengths, dtype=torch.int64)
    else:
        counts = make_counts(lengths, "random", g)
    scores = torch.randn(int(cu_v[-1]), generator=g)
    return select_topk_ref(scores, cu_v, counts)[0]


def merge_case(layout: str, dtype: torch.dtype, mode: str, g: torch.Generator):
    """One case of the (layout, dtype, mode) test matrix of _merge_kept: its arguments but kept_idx
    (H = 33, R = 3, index dtypes varied with the case) and a kept_idx for them, on the CPU."""
    cu_dtype = INDEX_DTYPES[len(layout) % 2]
    vidx_dtype = INDEX_DTYPES[(len(layout) + len(mode)) % 2]
    args = make_merge_inputs(MERGE_LAYOUTS[layout], dtype, 33, 3, cu_dtype, vidx_dtype, g)
    return args, kept_for(args, mode, g)
