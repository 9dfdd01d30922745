"""Engine-side scoring on PACKED prompts: layer-0 modules -> instruction q / prefix k -> ops.

Nothing here imports vLLM. :func:`score_and_select` is the one step an engine that packs its
sequences (vLLM: one row per token, no batch dimension) needs from this package: given the
first decoder layer's input norm, q/k projection and rotary embedding as callables, and the
layer-0 inputs of every key row of every prompt, it returns the scores and the kept visual rows
through the public ops (``instruction_attention`` -> ``mapper_forward`` when a mapper is set ->
``select_topk``), batched over all prompts at once (varlen, ``cu_seqlens``).

:func:`encode_positions` / :func:`decode_positions` carry position ids (exactly) in extra
channels of an embedding tensor, which is how per-token positions travel with visual features
through an engine's encoder cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import tokenprune_kernels as tp
from tokenprune_kernels.mapper import TokenMapper


@dataclass(frozen=True)
class Layer0Fns:
    """The first decoder layer's query/key path on packed rows (no batch dimension).

    Attributes:
        norm: ``x [T, H] -> [T, H]``, the layer's input norm.
        qk: ``h [T, H] -> (q [T, Hq * D], k [T, Hk * D])``, the q/k projections (and per-head
            q/k norms where the model has them), before rotary.
        rotary: ``(positions [T] or [R, T], q, k) -> (q, k)`` the rotary embedding, same shapes.
        num_heads, num_kv_heads, head_dim: ``Hq``, ``Hk``, ``D`` (the heads ``qk`` returns).
        softmax_scale: the attention's logit scale; None means ``1 / sqrt(D)``.
    """

    norm: Callable[[torch.Tensor], torch.Tensor]
    qk: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    softmax_scale: float | None = None


@dataclass(frozen=True)
class PackedPrompts:
    """The key rows of ``B`` prompts, packed one after the other.

    Attributes:
        embeds: ``[T, H]`` float layer-0 inputs (token embeddings, visual features in place).
        positions: ``[T]`` (1-D RoPE) or ``[R, T]`` (e.g. M-RoPE t/h/w) int64 position ids.
        cu_seqlens: ``[B + 1]`` int64 row offsets of the prompts.
        query_rows: ``[Tq]`` int64 global rows of the instruction tokens, ascending.
        cu_seqlens_q: ``[B + 1]`` int64 offsets of each prompt's instruction rows.
        visual_rows: ``[Tv]`` int64 global rows of the visual tokens to rank, ascending.
        cu_seqlens_v: ``[B + 1]`` int64 offsets of each prompt's visual rows.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    query_rows: torch.Tensor
    cu_seqlens_q: torch.Tensor
    visual_rows: torch.Tensor
    cu_seqlens_v: torch.Tensor


def _local(rows: torch.Tensor, cu_rows: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position of each global row inside its own prompt."""
    counts = (cu_rows[1:] - cu_rows[:-1]).to(torch.int64)
    starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.int64), counts)
    return rows.to(torch.int64) - starts


def score_and_select(
    layer0: Layer0Fns,
    packed: PackedPrompts,
    *,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
    mapper: TokenMapper | None = None,
    spread_radius: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every prompt's visual rows from layer-0 attention and keep the top ones.

    Args:
        layer0: the model's first layer (:class:`Layer0Fns`).
        packed: the prompts (:class:`PackedPrompts`); each prompt's instruction rows see the
            rows before them (causal), every visual row of the prompt among them.
        keep_ratio, keep_count: exactly one; as in :func:`tokenprune_kernels.select_topk`.
        mapper: None ranks by the raw attention (training-free); else the mapper's logits.
        spread_radius: the spread rule (``select_topk``'s), 0 for the plain top-k; > 0 needs
            ``packed.positions`` ``[3, T]`` M-RoPE (t, h, w) ids: each prompt item's visual
            tokens are then one image (one segment) or a video (one segment per frame), as
            :func:`tokenprune_kernels.transformers.prune.thw_spread_coords` reads them.

    Returns:
        scores ``[Tv]`` float32 (the ranked values), kept_idx ``[Tkept]`` int64 (global indices
        into ``packed.visual_rows``, ascending), cu_seqlens_kept ``[B + 1]``.
    """
    with torch.no_grad():
        h = layer0.norm(packed.embeds)
        q, k = layer0.qk(h)
        q, k = layer0.rotary(packed.positions, q, k)
        q = q[packed.query_rows].reshape(-1, layer0.num_heads, layer0.head_dim)
        k = k.reshape(-1, layer0.num_kv_heads, layer0.head_dim)
        scores = tp.instruction_attention(
            q,
            k,
            packed.cu_seqlens_q,
            packed.cu_seqlens,
            _local(packed.visual_rows, packed.cu_seqlens_v, packed.cu_seqlens),
            packed.cu_seqlens_v,
            q_pos=_local(packed.query_rows, packed.cu_seqlens_q, packed.cu_seqlens),
            softmax_scale=layer0.softmax_scale,
        )
        if mapper is not None:
            params = [p.to(device=scores.device, dtype=torch.float32) for p in mapper.op_params()]
            scores = tp.mapper_forward(
                scores,
                packed.cu_seqlens_v,
                params,
                mapper.config.kernel_size,
                mapper.config.input_eps,
            )
        coords = None
        if spread_radius > 0:
            coords = _spread_coords(packed)
        kept_idx, cu_kept = tp.select_topk(
            scores, packed.cu_seqlens_v, keep_ratio=keep_ratio, keep_count=keep_count,
            spread_coords=coords, spread_radius=spread_radius,
        )  # fmt: skip
    return scores, kept_idx, cu_kept


def _spread_coords(packed: PackedPrompts) -> torch.Tensor:
    """``[Tv, 3]`` (segment, h, w) of the visual rows from their M-RoPE ids (a new item at each
    prompt's first visual row)."""
    from tokenprune_kernels.transformers.prune import thw_spread_coords

    pos = packed.positions
    if pos.dim() != 2 or pos.shape[0] != 3:
        raise ValueError(
            "tokenprune: spread_radius > 0 needs [3, T] M-RoPE (t, h, w) positions, got "
            f"{list(pos.shape)}"
        )
    tv = packed.visual_rows.shape[0]
    starts = packed.cu_seqlens_v[:-1].to(device=pos.device, dtype=torch.int64)
    new_item = torch.zeros(tv, dtype=torch.bool, device=pos.device)
    new_item[starts[starts < tv]] = True
    return thw_spread_coords(pos[:, packed.visual_rows], new_item)


# --------------------------------------------------------------------------------------------
# Positions carried in embedding channels
# --------------------------------------------------------------------------------------------

_DIGIT = 128  # exact in bf16 / fp16 / fp32
_DIGITS = 3  # positions < 128**3 = 2_097_152
POSITION_LIMIT = _DIGIT**_DIGITS

FLAG_KEEP = 0.0  # the engine's own position ids stand (an unpruned item)
FLAG_SET = 1.0  # the carried ids replace the engine's
FLAG_UNSCORED = 2.0  # not pruned for lack of context (profiling only)


def position_channels(rows: int) -> int:
    """Extra channels :func:`encode_positions` appends for ``rows`` position rows."""
    return 1 + rows * _DIGITS


def encode_positions(
    embeds: torch.Tensor, positions: torch.Tensor | None, flag: float
) -> torch.Tensor:
    """Append ``positions`` to ``embeds`` as exact small numbers in ``embeds``' dtype.

    Args:
        embeds: ``[N, H]`` float32/float16/bfloat16.
        positions: ``[R, N]`` int64 ids in ``[0, POSITION_LIMIT)``, or None (zeros).
        flag: :data:`FLAG_KEEP`, :data:`FLAG_SET` or :data:`FLAG_UNSCORED`.

    Returns:
        ``[N, H + 1 + 3 R]``: the flag, then base-128 digits of each row, low digit first.
    """
    n = embeds.shape[0]
    if positions is None:
        positions = torch.zeros(3, n, dtype=torch.int64, device=embeds.device)
    if positions.dim() != 2 or positions.shape[1] != n:
        raise ValueError(f"positions must be [R, {n}], got {list(positions.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= POSITION_LIMIT):
        raise ValueError(f"position ids must be in [0, {POSITION_LIMIT}) to be carried")
    p = positions.to(device=embeds.device, dtype=torch.int64).t()  # [N, R]
    digits = torch.stack([(p // _DIGIT**i) % _DIGIT for i in range(_DIGITS)], dim=-1)
    flag_col = torch.full((n, 1), flag, dtype=embeds.dtype, device=embeds.device)
    return torch.cat([embeds, flag_col, digits.reshape(n, -1).to(embeds.dtype)], dim=1)


def decode_positions(
    carried: torch.Tensor, hidden: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split what :func:`encode_positions` made: ``(embeds [N, hidden], flags [N] float32,
    positions [rows, N] int64)``."""
    if carried.dim() != 2 or carried.shape[1] != hidden + position_channels(rows):
        raise ValueError(
            f"expected [N, {hidden + position_channels(rows)}] (hidden {hidden} + carried "
            f"positions), got {list(carried.shape)}"
        )
    flags = carried[:, hidden].float()
    digits = carried[:, hidden + 1 :].to(torch.int64).reshape(-1, rows, _DIGITS)
    scale = torch.tensor([_DIGIT**i for i in range(_DIGITS)], device=carried.device)
    positions = (digits * scale).sum(-1).t().contiguous()
    return carried[:, :hidden], flags, positions
