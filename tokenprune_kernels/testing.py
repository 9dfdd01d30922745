"""Random packed inputs of realistic layout, and trained-looking mapper parameters, for tests,
benchmarks and examples.

A sample is a list of segments in sequence order: ``("t", n)`` text, ``("v", n)`` visual tokens,
``("q", n)`` instruction tokens (text whose layer-0 queries score the visual tokens). The key
sequence of a sample is its prefix up to its last instruction token; anything after (an assistant
header, say) is in the full sequence only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from tokenprune_kernels import _extension, backend
from tokenprune_kernels.validation import KeepRule, ScoringArgs, segment_ids

Segment = tuple[str, int]


@dataclass
class PruningInputs:
    """Everything the ops take, packed. Shapes in the contract's symbols (docs/contract.md)."""

    q: torch.Tensor  # [Tq, Hq, D]
    k: torch.Tensor  # [Tk, Hk, D]
    cu_seqlens_q: torch.Tensor  # [B+1]
    cu_seqlens_k: torch.Tensor  # [B+1]
    q_pos: torch.Tensor  # [Tq] local key position of each query
    visual_idx: torch.Tensor  # [Tv] local position of each visual token
    cu_seqlens_v: torch.Tensor  # [B+1]
    visual_embeds: torch.Tensor  # [Tv, H]
    visual_position_ids: torch.Tensor  # [R, Tv]
    inputs_embeds: torch.Tensor  # [Tl, H] (visual rows hold garbage placeholders)
    position_ids: torch.Tensor  # [R, Tl]
    cu_seqlens: torch.Tensor  # [B+1]
    queries_last: bool  # True when every sample's queries are the last keys (q_pos may be None)

    def scoring(self, q_pos: bool = False) -> ScoringArgs:
        """Stage a's arguments (``q_pos`` passed only when asked: None otherwise)."""
        return ScoringArgs(
            self.q, self.k, self.cu_seqlens_q, self.cu_seqlens_k, self.visual_idx,
            self.cu_seqlens_v, self.q_pos if q_pos else None,
        )  # fmt: skip

    def to(self, device: torch.device | str) -> PruningInputs:
        return self._map(lambda t: t.to(device))

    def strided(self) -> PruningInputs:
        """The same inputs, every tensor a non-contiguous view (see :func:`strided`)."""
        return self._map(strided)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PruningInputs:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PruningInputs(
            **{k: fn(t) if isinstance(t, torch.Tensor) else t for k, t in values.items()}
        )


def strided(t: torch.Tensor, fill: float | None = None) -> torch.Tensor:
    """``t``'s values in a non-contiguous view of a larger buffer: along the last axis every other
    element, from storage offset 1; the gaps hold ``fill``. A kernel that ignores strides and
    reads the view as flat memory reads ``fill``: by default a huge value (an out-of-range index,
    a score that wins every selection), so it shows.

    Any shape with at least one axis and one element per row; a 0-D tensor comes back as is.
    """
    if t.dim() == 0:
        return t
    if fill is None:
        fill = 1e4 if t.is_floating_point() else 1 << 30
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), fill, dtype=t.dtype, device=t.device)
    view = buf[..., 1::2]
    view.copy_(t)
    return view


def simple_layout(
    n_visual: int, n_instruction: int, n_system: int = 14, n_after: int = 0
) -> list[Segment]:
    """[system text][visual][instruction][text after], the common single-image prompt."""
    layout: list[Segment] = [("t", n_system), ("v", n_visual), ("q", n_instruction)]
    if n_after:
        layout.append(("t", n_after))
    return layout


#: Batches for stage a's parity tests (each backend's tests add their own long ones). ``ragged``:
#: two images then 3 queries; a sample without visual tokens; 5 queries (key lengths 21, 4, 24,
#: no multiple of a block). ``interleaved``: queries before and between the images (q_pos given),
#: so some visual keys come after some queries; one query in the second sample.
ATTENTION_LAYOUTS: dict[str, list[list[Segment]]] = {
    "ragged": [
        [("t", 3), ("v", 7), ("t", 2), ("v", 5), ("q", 3), ("t", 1)],
        [("t", 2), ("q", 2)],
        [("v", 19), ("q", 5)],
    ],
    "interleaved": [
        [("t", 2), ("q", 2), ("v", 9), ("q", 1), ("v", 4), ("q", 4)],
        [("t", 1), ("v", 3), ("q", 1)],
    ],
}


def make_inputs(
    layouts: Sequence[Sequence[Segment]],
    heads_q: int = 4,
    heads_k: int = 2,
    head_dim: int = 16,
    hidden: int = 32,
    position_rows: int = 3,
    dtype: torch.dtype = torch.float32,
    index_dtype: torch.dtype = torch.int64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    qk_std: float = 1.0,
) -> PruningInputs:
    """Random inputs for a batch of samples with the given segment layouts.

    q and k are N(0, qk_std^2) (after the 1/sqrt(D) scale the logits are N(0, qk_std^4)), the
    embeddings N(0, 1); position ids are distinct random-ish but increasing per row so a wrong
    gather is visible. Every sample must have at least one instruction token when it has visual
    tokens (make it so in the layout).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    q_rows, k_counts, q_pos, v_idx, v_counts, l_counts = [], [], [], [], [], []
    for layout in layouts:
        pos = 0
        last_q_end = 0
        sample_q = []
        sample_v = []
        for kind, n in layout:
            if kind not in ("t", "v", "q") or n < 0:
                raise ValueError(f"segment must be ('t'|'v'|'q', n >= 0), got {(kind, n)!r}")
            if kind == "v":
                sample_v.extend(range(pos, pos + n))
            if kind == "q":
                sample_q.extend(range(pos, pos + n))
                if n:
                    last_q_end = pos + n
            pos += n
        q_rows.append(len(sample_q))
        q_pos.extend(sample_q)
        k_counts.append(last_q_end)
        v_idx.extend(sample_v)
        v_counts.append(len(sample_v))
        l_counts.append(pos)

    def cu(counts: list[int]) -> torch.Tensor:
        out = torch.zeros(len(counts) + 1, dtype=index_dtype)
        out[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).to(index_dtype)
        return out

    tq, tk, tv, tl = sum(q_rows), sum(k_counts), sum(v_counts), sum(l_counts)
    queries_last = True
    offset = 0
    for nq, nk in zip(q_rows, k_counts, strict=True):
        local = q_pos[offset : offset + nq]
        queries_last &= local == list(range(nk - nq, nk))
        offset += nq

    q = torch.randn(tq, heads_q, head_dim, generator=g) * qk_std
    k = torch.randn(tk, heads_k, head_dim, generator=g) * qk_std
    inputs_embeds = torch.randn(tl, hidden, generator=g)
    visual_embeds = torch.randn(tv, hidden, generator=g)
    steps = torch.randint(1, 3, (position_rows, tl), generator=g)
    position_ids = torch.cumsum(steps, dim=1)
    cu_l = cu(l_counts)
    v_local = torch.tensor(v_idx, dtype=torch.int64)
    seg_v = segment_ids(cu(v_counts), tv)
    v_global = cu_l.to(torch.int64)[seg_v] + v_local
    inputs = PruningInputs(
        q=q.to(dtype),
        k=k.to(dtype),
        cu_seqlens_q=cu(q_rows),
        cu_seqlens_k=cu(k_counts),
        q_pos=torch.tensor(q_pos, dtype=index_dtype),
        visual_idx=v_local.to(index_dtype),
        cu_seqlens_v=cu(v_counts),
        visual_embeds=visual_embeds.to(dtype),
        visual_position_ids=position_ids[:, v_global],
        inputs_embeds=inputs_embeds.to(dtype),
        position_ids=position_ids,
        cu_seqlens=cu_l,
        queries_last=queries_last,
    )
    return inputs.to(device)


def backend_cases(op: str) -> list[tuple[str, str, str | None]]:
    """``(backend, device, why not)`` for every backend the op table lists for ``op`` (for a
    composite: for any of its stages), in table order: what the parity tests run over.

    ``device`` is where the backend's kernels take tensors: ``cuda`` for ``cuda``, for ``triton``
    too when a GPU is visible (else the CPU, under the interpreter: ``TRITON_INTERPRET=1`` must be
    set before the first kernel import), ``cpu`` otherwise. ``why not`` is None when the backend
    runs ``op`` there now, else the reason it cannot (no extension, no GPU, no Triton).
    """
    stages = backend.COMPOSITES.get(op, (op,))
    cases = []
    for name in backend.BACKENDS:
        if not any(name in backend.OPS[stage] for stage in stages):
            continue
        gpu = torch.cuda.is_available()
        device = "cuda" if name == "cuda" or (name == "triton" and gpu) else "cpu"
        runs = any(backend.implemented(stage, name, device) for stage in stages)
        cases.append((name, device, None if runs else _why_not(name, device, op)))
    return cases


def _why_not(name: str, device: str, op: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return f"{name}: needs a CUDA GPU"
    if name == "triton" and importlib.util.find_spec("triton") is None:
        return "triton: not installed"
    if name in ("cpp", "cuda") and not _extension.available():
        return f"{name}: the compiled extension is not built ({_extension.load_error()})"
    return f"{name} has no {op} kernel for {device} tensors here"


def backend_params(op: str) -> list:
    """:func:`backend_cases` as pytest parameters ``(backend_name, device)``, id'd by the backend's
    name, those that cannot run here skipped with the reason, the ``cuda`` backend's marked
    ``cuda`` (``pytest -m cuda`` selects it; imports pytest: for tests only)."""
    import pytest

    params = []
    for name, device, why in backend_cases(op):
        marks = [pytest.mark.skip(reason=why)] if why else []
        if name == "cuda":
            marks.append(pytest.mark.cuda)
        params.append(pytest.param(name, device, id=name, marks=marks))
    return params


def planted_scores(
    n: int, dtype: torch.dtype, gen: torch.Generator, levels: int = 4
) -> torch.Tensor:
    """[n] scores of ``dtype`` with few distinct values (ties everywhere, negatives) and NaN,
    +-inf, -0.0 and +0.0 planted at random places: what a selection must order by the contract's
    rules rather than by luck."""
    s = (torch.randint(-levels, levels + 1, (n,), generator=gen).float() / 2).to(dtype)
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, float("nan"), -0.0]
    pick = torch.randperm(n, generator=gen)[: min(n, len(specials))]
    for i, p in enumerate(pick.tolist()):
        s[p] = specials[i]
    return s


def trained_like_mapper_params(
    channels: Sequence[int],
    kernel_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """A mapper's op parameters (``TokenMapper.op_params()`` order, float32, detached) that look
    trained: norm scales around 1, non-zero biases everywhere, weights spread around their
    initialisation, so every term of the computation matters in a comparison."""
    from tokenprune_kernels.mapper import MapperConfig, TokenMapper

    model = TokenMapper(MapperConfig(channels=tuple(channels), kernel_size=kernel_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.mul_(1.0 + 0.5 * noise)
    return [p.detach().to(device) for p in model.op_params()]


def oracle_keep_counts(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep: KeepRule,
    softmax: bool,
    gap: float = 1e-6,
) -> torch.Tensor:
    """[B] int64 keep counts of any keep rule for the model oracles, the adaptive rule computed
    independently of the ops' fixed-point weights: the relevance in float64 (``softmax`` of the
    scores, else the scores over their sum), summed in descending order until it reaches
    ``keep.keep_mass``, then bounded by the ratio rule's counts for ``keep.min_keep_ratio`` /
    ``keep.max_keep_ratio``. ``scores``: [Tv] finite floats; ``cu_seqlens_v``: [B+1] on the CPU.
    Asserts that no cumulative mass lies within ``gap`` of the threshold (the count would then
    depend on rounding: pick another seed)."""
    from tokenprune_kernels.reference import keep_counts_ref

    keep_mass = keep.keep_mass
    if keep_mass is None:
        return keep_counts_ref(cu_seqlens_v, keep_ratio=keep.keep_ratio, keep_count=keep.keep_count)
    lo = keep_counts_ref(cu_seqlens_v, keep_ratio=keep.min_keep_ratio).tolist()
    hi = keep_counts_ref(cu_seqlens_v, keep_ratio=keep.max_keep_ratio).tolist()
    bounds = cu_seqlens_v.tolist()
    counts = []
    for b in range(len(bounds) - 1):
        s = scores[bounds[b] : bounds[b + 1]].double()
        if s.numel() == 0:
            counts.append(0)
            continue
        p = torch.softmax(s, 0) if softmax else s / s.sum()
        cum = torch.cumsum(torch.sort(p, descending=True, stable=True).values, 0)
        assert bool(((cum - keep_mass).abs() > gap).all()), "mass near the threshold: reseed"
        m = min(int((cum < keep_mass).sum()) + 1, s.numel())
        counts.append(min(max(m, lo[b]), hi[b]))
    return torch.tensor(counts, dtype=torch.int64)
