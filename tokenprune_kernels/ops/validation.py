"""Argument checks shared by the fake (meta) kernels and the real implementations.

``check_*`` functions look only at ranks, sizes, dtypes and devices, so they run on fake tensors
under ``torch.compile``; ``check_*_values`` functions read tensor data (offsets, indices) and run
in the real implementations only. Every error names the argument and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tokenprune_kernels.mapper.functional import validate_mapper_params

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(message: str) -> None:
    raise ValueError(message)


def require(cond: bool | torch.SymBool, message: str) -> None:
    """Raise ValueError(message) unless ``cond`` (symbolic-shape friendly)."""
    torch._check_with(ValueError, cond, lambda: message)


def check_rank(name: str, t: torch.Tensor, ranks: int | Sequence[int], layout: str) -> None:
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.dim() not in allowed:
        _fail(f"{name} must be {layout}, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(
            f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            _fail(
                f"all tensors must be on one device: {first_name} is on {first.device} but "
                f"{name} is on {t.device}"
            )


def check_cu_seqlens(name: str, cu: torch.Tensor) -> None:
    check_rank(name, cu, 1, "[batch + 1] offsets")
    check_dtype(name, cu, INDEX_DTYPES)
    require(cu.shape[0] >= 2, f"{name} must have batch + 1 >= 2 entries, got {cu.shape[0]}")


def check_same_batch(**cus: torch.Tensor) -> None:
    items = list(cus.items())
    first_name, first = items[0]
    for name, cu in items[1:]:
        require(
            cu.shape[0] == first.shape[0],
            f"{name} has {cu.shape[0]} entries but {first_name} has {first.shape[0]}: every "
            "cu_seqlens of one call must describe the same batch",
        )


def check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int, total_name: str) -> list[int]:
    """Offsets start at 0, never decrease and end at ``total``. Returns them as Python ints."""
    values = [int(v) for v in cu.tolist()]
    if values[0] != 0:
        _fail(f"{name} must start at 0, got {name}[0] = {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            _fail(
                f"{name} must be non-decreasing, got {name}[{i - 1}] = {values[i - 1]} > "
                f"{name}[{i}] = {values[i]}"
            )
    if values[-1] != total:
        _fail(f"{name} must end at {total_name} = {total}, got {name}[-1] = {values[-1]}")
    return values


def check_keep(keep_ratio: float | None, keep_count: int | None) -> None:
    if (keep_ratio is None) == (keep_count is None):
        _fail(
            "give exactly one of keep_ratio and keep_count, got "
            f"keep_ratio={keep_ratio!r}, keep_count={keep_count!r}"
        )
    if keep_ratio is not None and not (0.0 < keep_ratio <= 1.0):  # NaN fails too
        _fail(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if keep_count is not None and keep_count < 1:
        _fail(f"keep_count must be >= 1, got {keep_count}")


def check_keep_count_values(keep_count: int | None, bounds_v: list[int]) -> None:
    if keep_count is None:
        return
    for b in range(len(bounds_v) - 1):
        n = bounds_v[b + 1] - bounds_v[b]
        if n >= 1 and keep_count > n:
            _fail(
                f"keep_count must be <= the visual tokens of every sample, got keep_count="
                f"{keep_count} but sample {b} has {n} visual tokens"
            )


def _segment_ids(bounds: list[int], device: torch.device) -> torch.Tensor:
    counts = torch.tensor(
        [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)], device=device
    )
    return torch.repeat_interleave(torch.arange(len(bounds) - 1, device=device), counts)


def check_visual_idx_values(
    visual_idx: torch.Tensor, bounds_v: list[int], lengths: list[int], length_name: str
) -> None:
    """Local indices within [0, length of the sample), strictly increasing within each sample."""
    if visual_idx.numel() == 0:
        return
    idx = visual_idx.to(torch.int64)
    seg = _segment_ids(bounds_v, idx.device)
    limit = torch.tensor(lengths, device=idx.device, dtype=torch.int64)[seg]
    bad = (idx < 0) | (idx >= limit)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        b = int(seg[i])
        _fail(
            f"visual_idx[{i}] = {int(idx[i])} is outside sample {b}'s {length_name} "
            f"[0, {lengths[b]})"
        )
    same = seg[1:] == seg[:-1]
    not_increasing = same & (idx[1:] <= idx[:-1])
    if bool(not_increasing.any()):
        i = int(torch.nonzero(not_increasing)[0]) + 1
        _fail(
            f"visual_idx must be strictly increasing within each sample, got visual_idx[{i - 1}] = "
            f"{int(idx[i - 1])} >= visual_idx[{i}] = {int(idx[i])} in sample {int(seg[i])}"
        )


# ---------------------------------------------------------------------------- per-op checks


def check_instruction_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    q_pos: torch.Tensor | None,
    softmax_scale: float | None,
) -> None:
    check_rank("q", q, 3, "[total_q, heads_q, head_dim]")
    check_rank("k", k, 3, "[total_k, heads_k, head_dim]")
    check_dtype("q", q, FLOAT_DTYPES)
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    require(
        q.shape[2] == k.shape[2],
        f"q and k must have the same head_dim, got q.shape[2] = {q.shape[2]} and "
        f"k.shape[2] = {k.shape[2]}",
    )
    require(k.shape[1] >= 1, f"k must have at least one head, got k.shape[1] = {k.shape[1]}")
    require(
        q.shape[1] % k.shape[1] == 0,
        f"query heads must be a multiple of key heads (grouped-query attention), got "
        f"q.shape[1] = {q.shape[1]} and k.shape[1] = {k.shape[1]}",
    )
    require(q.shape[2] >= 1, f"head_dim must be >= 1, got {q.shape[2]}")
    for name, cu in (
        ("cu_seqlens_q", cu_seqlens_q),
        ("cu_seqlens_k", cu_seqlens_k),
        ("cu_seqlens_v", cu_seqlens_v),
    ):
        check_cu_seqlens(name, cu)
    check_same_batch(
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, cu_seqlens_v=cu_seqlens_v
    )
    check_rank("visual_idx", visual_idx, 1, "[total_v] local key positions")
    check_dtype("visual_idx", visual_idx, INDEX_DTYPES)
    if q_pos is not None:
        check_rank("q_pos", q_pos, 1, "[total_q] local key positions")
        check_dtype("q_pos", q_pos, INDEX_DTYPES)
        require(
            q_pos.shape[0] == q.shape[0],
            f"q_pos must have one entry per query ({q.shape[0]}), got {q_pos.shape[0]}",
        )
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        _fail(f"softmax_scale must be a finite number > 0 or None, got {softmax_scale!r}")
    check_same_device(
        q=q, k=k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        visual_idx=visual_idx, cu_seqlens_v=cu_seqlens_v, q_pos=q_pos,
    )  # fmt: skip


def check_instruction_attention_values(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    q_pos: torch.Tensor | None,
) -> None:
    bq = check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q.shape[0]")
    bk = check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k.shape[0]")
    bv = check_cu_seqlens_values(
        "cu_seqlens_v", cu_seqlens_v, visual_idx.shape[0], "visual_idx.shape[0]"
    )
    nks = [bk[b + 1] - bk[b] for b in range(len(bk) - 1)]
    for b in range(len(bq) - 1):
        nq, nv = bq[b + 1] - bq[b], bv[b + 1] - bv[b]
        if nv > 0 and nq == 0:
            _fail(
                f"sample {b} has {nv} visual tokens but no instruction tokens "
                f"(cu_seqlens_q[{b}] == cu_seqlens_q[{b + 1}]); the score needs at least one "
                "instruction query"
            )
        if q_pos is None and nq > nks[b]:
            _fail(
                f"sample {b} has {nq} queries but only {nks[b]} keys; without q_pos the queries "
                "are the last keys of the sample, so they must be among the keys"
            )
    if q_pos is not None and q_pos.numel() > 0:
        seg = _segment_ids(bq, q_pos.device)
        limit = torch.tensor(nks, device=q_pos.device, dtype=torch.int64)[seg]
        pos = q_pos.to(torch.int64)
        bad = (pos < 0) | (pos >= limit)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            _fail(
                f"q_pos[{i}] = {int(pos[i])} is outside sample {int(seg[i])}'s key range "
                f"[0, {nks[int(seg[i])]})"
            )
    check_visual_idx_values(visual_idx, bv, nks, "key sequence")


def check_mapper(
    attn: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    params: Sequence[torch.Tensor],
    kernel_size: int,
    input_eps: float,
) -> None:
    check_rank("attn", attn, 1, "[total_v]")
    if attn.dtype != torch.float32:
        raise TypeError(f"attn must be float32, got {attn.dtype}")
    check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    if not (math.isfinite(input_eps) and input_eps > 0):
        _fail(f"input_eps must be a finite number > 0, got {input_eps!r}")
    validate_mapper_params(params, kernel_size)  # kernel_size, count, shapes, dtypes, devices
    if len(params) > 0 and params[0].device != attn.device:
        _fail(f"params must be on the device of attn ({attn.device}), got {params[0].device}")


def check_select(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep_ratio: float | None,
    keep_count: int | None,
) -> None:
    check_rank("scores", scores, 1, "[total_v]")
    check_dtype("scores", scores, FLOAT_DTYPES)
    check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    check_keep(keep_ratio, keep_count)
    check_same_device(scores=scores, cu_seqlens_v=cu_seqlens_v)


def check_gather(
    visual_embeds: torch.Tensor, position_ids: torch.Tensor, kept_idx: torch.Tensor
) -> None:
    check_rank("visual_embeds", visual_embeds, 2, "[total_v, hidden]")
    check_dtype("visual_embeds", visual_embeds, FLOAT_DTYPES)
    check_rank("position_ids", position_ids, (1, 2), "[total_v] or [rows, total_v]")
    check_dtype("position_ids", position_ids, INDEX_DTYPES)
    require(
        position_ids.shape[-1] == visual_embeds.shape[0],
        f"position_ids must have one column per visual token ({visual_embeds.shape[0]}), got "
        f"shape {tuple(position_ids.shape)}",
    )
    check_rank("kept_idx", kept_idx, 1, "[total_kept] global visual indices")
    if kept_idx.dtype != torch.int64:
        raise TypeError(f"kept_idx must be int64, got {kept_idx.dtype}")
    check_same_device(visual_embeds=visual_embeds, position_ids=position_ids, kept_idx=kept_idx)


def check_kept_idx_values(kept_idx: torch.Tensor, total_v: int) -> None:
    if kept_idx.numel() == 0:
        return
    lo, hi = int(kept_idx.min()), int(kept_idx.max())
    if lo < 0 or hi >= total_v:
        bad = lo if lo < 0 else hi
        _fail(f"kept_idx must index the {total_v} visual tokens, got an entry {bad}")


def check_merge(
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    kept_idx: torch.Tensor,
) -> None:
    check_rank("inputs_embeds", inputs_embeds, 2, "[total_len, hidden]")
    check_dtype("inputs_embeds", inputs_embeds, FLOAT_DTYPES)
    check_rank("visual_embeds", visual_embeds, 2, "[total_v, hidden]")
    if visual_embeds.dtype != inputs_embeds.dtype:
        raise TypeError(
            f"visual_embeds must have the dtype of inputs_embeds ({inputs_embeds.dtype}), got "
            f"{visual_embeds.dtype}"
        )
    require(
        visual_embeds.shape[1] == inputs_embeds.shape[1],
        f"visual_embeds must have the hidden size of inputs_embeds ({inputs_embeds.shape[1]}), "
        f"got {visual_embeds.shape[1]}",
    )
    check_rank("position_ids", position_ids, (1, 2), "[total_len] or [rows, total_len]")
    check_dtype("position_ids", position_ids, INDEX_DTYPES)
    require(
        position_ids.shape[-1] == inputs_embeds.shape[0],
        f"position_ids must have one column per sequence token ({inputs_embeds.shape[0]}), got "
        f"shape {tuple(position_ids.shape)}",
    )
    check_cu_seqlens("cu_seqlens", cu_seqlens)
    check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    check_same_batch(cu_seqlens=cu_seqlens, cu_seqlens_v=cu_seqlens_v)
    check_rank("visual_idx", visual_idx, 1, "[total_v] local sequence positions")
    check_dtype("visual_idx", visual_idx, INDEX_DTYPES)
    require(
        visual_idx.shape[0] == visual_embeds.shape[0],
        f"visual_idx must have one entry per row of visual_embeds ({visual_embeds.shape[0]}), got "
        f"{visual_idx.shape[0]}",
    )
    check_rank("kept_idx", kept_idx, 1, "[total_kept] global visual indices")
    if kept_idx.dtype != torch.int64:
        raise TypeError(f"kept_idx must be int64, got {kept_idx.dtype}")
    check_same_device(
        inputs_embeds=inputs_embeds, position_ids=position_ids, cu_seqlens=cu_seqlens,
        visual_embeds=visual_embeds, visual_idx=visual_idx, cu_seqlens_v=cu_seqlens_v,
        kept_idx=kept_idx,
    )  # fmt: skip


def check_merge_values(
    inputs_embeds: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    kept_idx: torch.Tensor,
) -> None:
    bl = check_cu_seqlens_values(
        "cu_seqlens", cu_seqlens, inputs_embeds.shape[0], "inputs_embeds.shape[0]"
    )
    bv = check_cu_seqlens_values(
        "cu_seqlens_v", cu_seqlens_v, visual_idx.shape[0], "visual_idx.shape[0]"
    )
    lengths = [bl[b + 1] - bl[b] for b in range(len(bl) - 1)]
    check_visual_idx_values(visual_idx, bv, lengths, "sequence")
    check_kept_idx_values(kept_idx, visual_idx.shape[0])
    if kept_idx.numel() > 1:
        not_increasing = kept_idx[1:] <= kept_idx[:-1]
        if bool(not_increasing.any()):
            i = int(torch.nonzero(not_increasing)[0]) + 1
            _fail(
                f"kept_idx must be strictly increasing (as select_topk returns it), got "
                f"kept_idx[{i - 1}] = {int(kept_idx[i - 1])} >= kept_idx[{i}] = {int(kept_idx[i])}"
            )
