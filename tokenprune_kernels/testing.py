"""Random packed inputs of realistic layout, and trained-looking mapper parameters, for tests,
benchmarks and examples.

A sample is a list of segments in sequence order: ``("t", n)`` text, ``("v", n)`` visual tokens,
``("q", n)`` instruction tokens (text whose layer-0 queries score the visual tokens). The key
sequence of a sample is its prefix up to its last instruction token; anything after (an assistant
header, say) is in the full sequence only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from tokenprune_kernels.validation import segment_ids

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

    def to(self, device: torch.device | str) -> PruningInputs:
        values = {
            f.name: (
                getattr(self, f.name).to(device) if f.name != "queries_last" else self.queries_last
            )
            for f in fields(self)
        }
        return PruningInputs(**values)


def simple_layout(
    n_visual: int, n_instruction: int, n_system: int = 14, n_after: int = 0
) -> list[Segment]:
    """[system text][visual][instruction][text after], the common single-image prompt."""
    layout: list[Segment] = [("t", n_system), ("v", n_visual), ("q", n_instruction)]
    if n_after:
        layout.append(("t", n_after))
    return layout


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
