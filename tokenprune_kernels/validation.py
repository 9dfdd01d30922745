"""Argument checks, the one copy shared by the ops' fakes, their implementations and the mapper.

``check_*`` functions look only at ranks, sizes, dtypes and devices, so they run on fake tensors
under ``torch.compile``; ``check_*_values`` functions read tensor data (offsets, indices) and run
in the real implementations only. Every error names the argument and what was expected.

Host synchronisation: reading a CUDA tensor on the host (``.tolist()``, ``.item()``,
``bool(t)``, ``int(t)``) waits until the GPU has finished all queued work. So each public
``check_*_values`` function reads the device ONCE per call (:func:`read_values`): every
element-wise rule becomes a boolean mask computed on the device, the masks reduce to one "some
rule is broken" flag, and the flag travels with all the call's offsets in a single ``tolist()``.
The offset rules are then checked on the host. Only when the flag is set do the detailed checks
(``_detailed_*``, the per-rule checks, which read more to find the first offending entry) run,
in the same order as ever, so a bad call raises exactly the error it always raised and a good
call pays one read. The device masks never index out of range, even on invalid offsets (they
are then garbage, but the offsets fail on the host first).

A leaf module (it imports torch only), so :mod:`tokenprune_kernels.mapper` and
:mod:`tokenprune_kernels.ops` can both use it.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class ScoringArgs(NamedTuple):
    """Stage a's arguments, in ``instruction_attention``'s order (so ``ScoringArgs(*args,
    **kwargs)`` binds a call of it): the scoring prefix of both composites, carried as one value
    through the op layer, the checks and the reference composites."""

    q: torch.Tensor
    k: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    visual_idx: torch.Tensor
    cu_seqlens_v: torch.Tensor
    q_pos: torch.Tensor | None = None
    softmax_scale: float | None = None

    def contiguous(self) -> ScoringArgs:
        """The same arguments with the 1-D offsets and indices contiguous (each copied only when
        it is not already): what a kernel reading flat memory needs, made once per call."""
        flat = {
            n: getattr(self, n).contiguous() for n in _SCORING_1D if getattr(self, n) is not None
        }
        return self._replace(**flat)


_SCORING_1D = ("cu_seqlens_q", "cu_seqlens_k", "visual_idx", "cu_seqlens_v", "q_pos")


class MapperArgs(NamedTuple):
    """The mapper's configuration as ``mapper_forward`` takes it: ``params`` (empty: no mapper,
    the composites then rank the raw attention), ``kernel_size``, ``input_eps``, ``grid`` (the
    visual tokens' grid positions [Tv, 2] for a mapper with grid input, else None)."""

    params: Sequence[torch.Tensor] = ()
    kernel_size: int = 5
    input_eps: float = 1e-4
    grid: torch.Tensor | None = None

    def head_groups(self) -> int:
        """The attention channels ``G`` the mapper's first block takes (its input channels, less
        the grid's two); 1 without a mapper. ``params`` must have been checked."""
        if len(self.params) == 0:
            return 1
        return int(self.params[0].shape[0]) - (0 if self.grid is None else 2)


class MergeArgs(NamedTuple):
    """``merge_kept``'s arguments, in its order (``MergeArgs(*args, **kwargs)`` binds a call)."""

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    visual_embeds: torch.Tensor
    visual_idx: torch.Tensor
    cu_seqlens_v: torch.Tensor
    kept_idx: torch.Tensor


class KeepRule(NamedTuple):
    """How many visual tokens each sample keeps: exactly one of ``keep_ratio``, ``keep_count``
    and ``keep_mass`` (the adaptive rule, bounded by ``min_keep_ratio`` / ``max_keep_ratio``).
    The keep arguments of ``select_topk`` and of the composites, in their order."""

    keep_ratio: float | None = None
    keep_count: int | None = None
    keep_mass: float | None = None
    min_keep_ratio: float = 0.0
    max_keep_ratio: float = 1.0


#: The largest ``spread_radius`` the ops take: a (2r+1)^2 neighbourhood, already far wider than
#: any image's token grid is useful for at r = 64 (the suppression cost grows with r^2).
MAX_SPREAD_RADIUS = 64


class SpreadRule(NamedTuple):
    """The spread rule of the selection (``docs/contract.md``, stage c): ``coords`` [Tv, 3]
    int32/int64 (segment, row, col) of the visual tokens, strictly increasing within each
    sample, or None (no spread: the plain top-k); ``radius`` the Chebyshev suppression radius
    (0 <= radius <= :data:`MAX_SPREAD_RADIUS`; > 0 needs ``coords``). The trailing arguments
    ``spread_coords`` / ``spread_radius`` of ``select_topk`` and the composites, in order."""

    coords: torch.Tensor | None = None
    radius: int = 0


#: No spread rule: the plain top-k (the default of every argument taking a :class:`SpreadRule`).
NO_SPREAD = SpreadRule()


class PruneArgs(NamedTuple):
    """``prune_visual_tokens``'s arguments grouped, in ``prune_visual_tokens_ref``'s order."""

    scoring: ScoringArgs
    visual_embeds: torch.Tensor
    visual_position_ids: torch.Tensor
    mapper: MapperArgs
    keep: KeepRule
    spread: SpreadRule = NO_SPREAD


class PruneMergeArgs(NamedTuple):
    """``prune_and_merge``'s arguments grouped, in ``prune_and_merge_ref``'s order."""

    scoring: ScoringArgs
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    visual_embeds: torch.Tensor
    mapper: MapperArgs
    keep: KeepRule
    spread: SpreadRule = NO_SPREAD

    def merge(self, kept_idx: torch.Tensor) -> MergeArgs:
        """The merge's arguments for ``kept_idx`` (the visual indices and offsets: stage a's)."""
        s = self.scoring
        return MergeArgs(
            self.inputs_embeds, self.position_ids, self.cu_seqlens, self.visual_embeds,
            s.visual_idx, s.cu_seqlens_v, kept_idx,
        )  # fmt: skip


def flat_args(bundle: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: an implementation ``fn(b, extra=..., *, options)`` taking a ``bundle`` (a
    NamedTuple above) becomes callable with the bundle's fields flat, positionally or by name (as
    ``bundle(*args, **kwargs)`` binds them), then ``fn``'s own positional parameters after the
    bundle (``extra``: a stage that takes the bundle and more, such as
    ``instruction_attention_heads``'s ``head_groups``; they need defaults, as the bundle's last
    fields have them), then its keyword-only options (all other keywords when ``fn`` takes
    ``**options``). The wrapper's signature says so (for ``inspect`` and the op table's
    convention test), so the flat argument list of a stage is written once, in its bundle,
    however many implementations take it."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[1:]
        extra = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        own = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
        n, fields = len(bundle._fields), frozenset(bundle._fields)
        names = frozenset(p.name for p in (*extra, *own))
        any_keyword = any(p.kind is p.VAR_KEYWORD for p in own)

        @functools.wraps(fn)
        def flat(*args: Any, **kwargs: Any) -> Any:
            mine = [k for k in kwargs if k in names or (any_keyword and k not in fields)]
            options = {k: kwargs.pop(k) for k in mine}
            return fn(bundle(*args[:n], **kwargs), *args[n:], **options)

        flat_fields = list(inspect.signature(bundle).parameters.values())
        flat.__signature__ = sig.replace(parameters=[*flat_fields, *extra, *own])  # type: ignore[attr-defined]
        return flat

    return wrap


def _fail(message: str) -> None:
    raise ValueError(message)


def require(cond: bool | torch.SymBool, message: str) -> None:
    """Raise ValueError(message) unless ``cond`` (symbolic-shape friendly)."""
    torch._check_with(ValueError, cond, lambda: message)


def check_rank(name: str, t: torch.Tensor, ranks: int | Sequence[int], layout: str) -> None:
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.dim() not in allowed:
        expected = " or ".join(f"{r}-D" for r in allowed)
        _fail(
            f"{name} must be {expected} {layout}, got a {t.dim()}-D tensor of shape "
            f"{tuple(t.shape)}"
        )


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = [str(d).replace("torch.", "") for d in allowed]
        expected = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        got = str(t.dtype).replace("torch.", "")
        raise TypeError(f"{name} must be {expected}, got {got}")


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
    require(cu.shape[0] >= 1, f"{name} must have batch + 1 >= 1 entries, got {cu.shape[0]}")


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
    """Offsets start at 0, never decrease and end at ``total``. Returns them as Python ints.

    ``cu``: [B+1] int32/int64 (one device->host read)."""
    values = [int(v) for v in cu.tolist()]
    check_offsets(name, values, total, total_name)
    return values


def check_offsets(name: str, values: Sequence[int], total: int, total_name: str) -> None:
    """The rule of :func:`check_cu_seqlens_values` on offsets already read to the host."""
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


#: How ``select_topk``'s scores become the relevance whose mass ``keep_mass`` thresholds:
#: ``softmax`` of logits (the mapper's), or ``normalize`` non-negative masses (raw attention).
RELEVANCE = ("softmax", "normalize")


def check_keep(
    keep_ratio: float | None,
    keep_count: int | None,
    keep_mass: float | None = None,
    min_keep_ratio: float = 0.0,
    max_keep_ratio: float = 1.0,
) -> None:
    given = [n for n, x in (("keep_ratio", keep_ratio), ("keep_count", keep_count),
                            ("keep_mass", keep_mass)) if x is not None]  # fmt: skip
    if len(given) != 1:
        _fail(
            "give exactly one of keep_ratio, keep_count and keep_mass, got "
            f"keep_ratio={keep_ratio!r}, keep_count={keep_count!r}, keep_mass={keep_mass!r}"
        )
    if keep_ratio is not None and not (0.0 < keep_ratio <= 1.0):  # NaN fails too
        _fail(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if keep_count is not None and keep_count < 1:
        _fail(f"keep_count must be >= 1, got {keep_count}")
    if keep_mass is None:
        if (min_keep_ratio, max_keep_ratio) != (0.0, 1.0):
            _fail(
                "min_keep_ratio and max_keep_ratio bound keep_mass only; got "
                f"min_keep_ratio={min_keep_ratio!r}, max_keep_ratio={max_keep_ratio!r} with "
                f"{given[0]}"
            )
        return
    if not (0.0 < keep_mass <= 1.0):
        _fail(f"keep_mass must be in (0, 1], got {keep_mass!r}")
    if not (0.0 <= min_keep_ratio <= 1.0):
        _fail(f"min_keep_ratio must be in [0, 1], got {min_keep_ratio!r}")
    if not (0.0 < max_keep_ratio <= 1.0):
        _fail(f"max_keep_ratio must be in (0, 1], got {max_keep_ratio!r}")
    if min_keep_ratio > max_keep_ratio:
        _fail(
            f"min_keep_ratio must be <= max_keep_ratio, got min_keep_ratio={min_keep_ratio!r} > "
            f"max_keep_ratio={max_keep_ratio!r}"
        )


def check_relevance(relevance: str) -> None:
    if relevance not in RELEVANCE:
        _fail(f"relevance must be one of {', '.join(map(repr, RELEVANCE))}, got {relevance!r}")


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


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: the sample each packed row belongs to (``cu_seqlens`` [B+1] int)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=cu_seqlens.device), counts, output_size=total
    )


def _check_local_positions(
    name: str, idx: torch.Tensor, cu: torch.Tensor, lengths: list[int], what: str
) -> torch.Tensor:
    """Each ``idx[i]`` lies in ``[0, lengths[sample of i])``. Returns the segment ids."""
    seg = segment_ids(cu.to(idx.device), idx.shape[0])
    pos = idx.to(torch.int64)
    limit = torch.tensor(lengths, device=idx.device, dtype=torch.int64)[seg]
    bad = (pos < 0) | (pos >= limit)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        b = int(seg[i])
        _fail(f"{name}[{i}] = {int(pos[i])} is outside sample {b}'s {what} [0, {lengths[b]})")
    return seg


def check_visual_idx_values(
    visual_idx: torch.Tensor, cu_seqlens_v: torch.Tensor, lengths: list[int], length_name: str
) -> None:
    """Local indices within [0, length of the sample), strictly increasing within each sample."""
    if visual_idx.numel() == 0:
        return
    seg = _check_local_positions("visual_idx", visual_idx, cu_seqlens_v, lengths, length_name)
    idx = visual_idx.to(torch.int64)
    not_increasing = (seg[1:] == seg[:-1]) & (idx[1:] <= idx[:-1])
    if bool(not_increasing.any()):
        i = int(torch.nonzero(not_increasing)[0]) + 1
        _fail(
            f"visual_idx must be strictly increasing within each sample, got visual_idx[{i - 1}] = "
            f"{int(idx[i - 1])} >= visual_idx[{i}] = {int(idx[i])} in sample {int(seg[i])}"
        )


# ------------------------------------------------------------- one device->host read per call


def read_values(
    offsets: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] = ()
) -> tuple[list[list[int]], bool]:
    """Read offsets and a rule-violation flag from the device in ONE transfer.

    Args:
        offsets: 1-D int32/int64 tensors (the call's ``cu_seqlens``), all on one device.
        masks: 1-D bool tensors of any lengths on that device, True where a rule is broken.

    Returns:
        (each offsets tensor as a list of Python ints, in order; True when some mask holds a
        True). One ``tolist()`` of a single concatenated tensor: one host sync on a GPU.
    """
    nonempty = [m.reshape(-1) for m in masks if m.numel() > 0]
    parts = [cu.reshape(-1) for cu in offsets]
    if nonempty:
        flag = (nonempty[0] if len(nonempty) == 1 else torch.cat(nonempty)).any()
        parts.append(flag.reshape(1))
    if not parts:
        return [], False
    flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
    values, start = [], 0
    for cu in offsets:
        values.append([int(x) for x in flat[start : start + cu.numel()]])
        start += cu.numel()
    return values, bool(nonempty) and bool(flat[-1])


def _lengths(cu: torch.Tensor) -> torch.Tensor:
    """[B] per-sample lengths of offsets ``cu`` [B+1] (dtype of ``cu``; garbage if invalid)."""
    return cu[1:] - cu[:-1]


def _position_masks(
    idx: torch.Tensor, cu: torch.Tensor, limits: torch.Tensor, increasing: bool
) -> list[torch.Tensor]:
    """Device masks of the rules "``idx[i]`` lies in ``[0, limits[sample of i])``" and, with
    ``increasing``, "``idx`` is strictly increasing within each sample".

    ``idx`` [T] int, ``cu`` [B+1] its offsets, ``limits`` [B]. The sample of each entry comes
    from a binary search over the inner offsets, so it stays in ``[0, B-1]`` (no out-of-range
    index, no error) even when ``cu`` is invalid; the masks are then meaningless, which is fine
    because the offsets are checked first on the host.
    """
    if idx.numel() == 0 or cu.shape[0] < 2:  # no entries, or B == 0 (then T > 0 fails cu's check)
        return []
    rows = torch.arange(idx.shape[0], device=cu.device, dtype=cu.dtype)
    seg = torch.searchsorted(cu[1:-1].contiguous(), rows, right=True)
    masks = [(idx < 0) | (idx >= limits[seg])]
    if increasing:
        masks.append((seg[1:] == seg[:-1]) & (idx[1:] <= idx[:-1]))
    return masks


def _scoring_masks(s: ScoringArgs, cu_seqlens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Device masks of stage a's position rules (q_pos and visual_idx within the key range,
    visual_idx strictly increasing); with ``cu_seqlens``, visual_idx also within the sequence."""
    key_lengths = _lengths(s.cu_seqlens_k)
    masks = []
    if s.q_pos is not None:
        masks += _position_masks(s.q_pos, s.cu_seqlens_q, key_lengths, increasing=False)
    limits = key_lengths
    if cu_seqlens is not None:
        limits = torch.minimum(key_lengths, _lengths(cu_seqlens))
    masks += _position_masks(s.visual_idx, s.cu_seqlens_v, limits, increasing=True)
    return masks


def _kept_masks(kept_idx: torch.Tensor, total_v: int) -> list[torch.Tensor]:
    """Device masks of the kept_idx rules: within ``[0, total_v)`` and strictly increasing."""
    if kept_idx.numel() == 0:
        return []
    return [(kept_idx < 0) | (kept_idx >= total_v), kept_idx[1:] <= kept_idx[:-1]]


# ---------------------------------------------------------------------------- per-op checks


def check_instruction_attention(s: ScoringArgs) -> None:
    """Ranks, dtypes, sizes and devices of stage a's arguments (see ``instruction_attention``)."""
    q, k, cu_seqlens_q, cu_seqlens_k, visual_idx, cu_seqlens_v, q_pos, softmax_scale = s
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
    require(q.shape[1] >= 1, f"q must have at least one head, got q.shape[1] = {q.shape[1]}")
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
    tensors = s._asdict()
    del tensors["softmax_scale"]
    check_same_device(**tensors)


def check_head_groups(head_groups: int | None, q: torch.Tensor, k: torch.Tensor) -> int:
    """``instruction_attention_heads``'s ``head_groups``: None (``Hk``) or an int >= 1 dividing
    ``Hq``; returns the resolved ``G``."""
    if head_groups is None:
        return int(k.shape[1])
    if isinstance(head_groups, bool) or not isinstance(head_groups, int):
        raise TypeError(f"head_groups must be an int or None, got {type(head_groups).__name__}")
    require(
        head_groups >= 1 and q.shape[1] % head_groups == 0,
        f"head_groups must be an int >= 1 dividing the query heads (q.shape[1] = {q.shape[1]}), "
        f"got {head_groups}",
    )
    return head_groups


def check_instruction_attention_values(s: ScoringArgs) -> list[int]:
    """Offsets, positions and the instruction/visual rule of stage a, in one device read.

    Returns the visual offsets as Python ints (for callers that check more against them).
    """
    return _check_scoring_values(s)[0]


def _check_scoring_values(
    s: ScoringArgs, cu_seqlens: torch.Tensor | None = None, spread: SpreadRule = NO_SPREAD
) -> tuple[list[int], list[int], bool]:
    """Stage a's value checks in one device read; with ``cu_seqlens`` (the merge's), its offsets
    and the rule "visual_idx lies in each sequence" ride in the same read, and so does the
    spread coordinates' order rule (its detailed check is the caller's, last). Returns (visual
    offsets, ``cu_seqlens``'s offsets or [], whether some device mask found a broken rule)."""
    masks = _scoring_masks(s, cu_seqlens) + _spread_masks(spread, s.cu_seqlens_v)
    offsets = [s.cu_seqlens_q, s.cu_seqlens_k, s.cu_seqlens_v]
    values, bad = read_values(offsets + ([] if cu_seqlens is None else [cu_seqlens]), masks)
    bq, bk, bv = values[:3]
    _check_scoring_offsets(s, bq, bk, bv)
    if bad:
        _detailed_scoring_positions(s, bk)
    return bv, (values[3] if cu_seqlens is not None else []), bad


def _check_scoring_offsets(s: ScoringArgs, bq: list[int], bk: list[int], bv: list[int]) -> None:
    """Stage a's rules on offsets already on the host."""
    check_offsets("cu_seqlens_q", bq, s.q.shape[0], "q.shape[0]")
    check_offsets("cu_seqlens_k", bk, s.k.shape[0], "k.shape[0]")
    check_offsets("cu_seqlens_v", bv, s.visual_idx.shape[0], "visual_idx.shape[0]")
    for b in range(len(bq) - 1):
        nq, nk, nv = bq[b + 1] - bq[b], bk[b + 1] - bk[b], bv[b + 1] - bv[b]
        if nv > 0 and nq == 0:
            _fail(
                f"sample {b} has {nv} visual tokens but no instruction tokens "
                f"(cu_seqlens_q[{b}] == cu_seqlens_q[{b + 1}]); the score needs at least one "
                "instruction query"
            )
        if s.q_pos is None and nq > nk:
            _fail(
                f"sample {b} has {nq} queries but only {nk} keys; without q_pos the queries "
                "are the last keys of the sample, so they must be among the keys"
            )


def _detailed_scoring_positions(s: ScoringArgs, bk: list[int]) -> None:
    """Stage a's position rules one at a time, naming the first offending entry (several device
    reads: run only once the offsets passed and a device mask found something wrong)."""
    nks = [bk[b + 1] - bk[b] for b in range(len(bk) - 1)]
    if s.q_pos is not None and s.q_pos.numel() > 0:
        _check_local_positions("q_pos", s.q_pos, s.cu_seqlens_q, nks, "key range")
    check_visual_idx_values(s.visual_idx, s.cu_seqlens_v, nks, "key sequence")


# -------------------------------------------------------------------------------- composites


def _check_composite_mapper(m: MapperArgs, s: ScoringArgs) -> None:
    """The composites' mapper: its parameters, the grid it may take, and its attention channels
    ``G`` (``instruction_attention_heads``'s ``head_groups`` when > 1), which must divide the
    query heads. Grid values are used as given (no device read)."""
    if m.grid is not None:
        if len(m.params) == 0:
            _fail("mapper_grid needs mapper_params: without a mapper nothing reads the grid")
        if not isinstance(m.grid, torch.Tensor):
            raise TypeError(f"mapper_grid must be a Tensor or None, got {type(m.grid).__name__}")
        if m.grid.dtype != torch.float32:
            raise TypeError(f"mapper_grid must be float32, got {m.grid.dtype}")
        tv = s.visual_idx.shape[0]
        require(
            tuple(m.grid.shape) == (tv, 2),
            f"mapper_grid must be [total_v, 2] = [{tv}, 2], got shape {tuple(m.grid.shape)}",
        )
        check_same_device(q=s.q, mapper_grid=m.grid)
    if len(m.params) == 0:
        return
    first = m.params[0]
    c0 = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() == 3 else 1
    check_mapper_config(m.params, m.kernel_size, m.input_eps, s.q.device, c0)
    groups = m.head_groups()
    grid_note = " less the 2 grid channels" if m.grid is not None else ""
    require(
        groups >= 1 and s.q.shape[1] % groups == 0,
        f"mapper_params take {c0} input channels: their attention channels ({groups}, the input "
        f"channels{grid_note}) must divide the query heads (q.shape[1] = {s.q.shape[1]})",
    )


def _check_composite(a: PruneArgs | PruneMergeArgs) -> None:
    """Static checks of stages a-c shared by both composites (fake and real)."""
    s = a.scoring
    check_instruction_attention(s)
    check_keep(*a.keep)
    check_spread(a.spread, s.visual_idx.shape[0], s.q.device)
    _check_composite_mapper(a.mapper, s)
    check_rank("visual_embeds", a.visual_embeds, 2, "[total_v, hidden]")
    require(
        a.visual_embeds.shape[0] == s.visual_idx.shape[0],
        f"visual_embeds must have one row per visual token ({s.visual_idx.shape[0]}), got "
        f"{a.visual_embeds.shape[0]}",
    )


def check_prune(a: PruneArgs) -> None:
    """Static checks of ``prune_visual_tokens``."""
    _check_composite(a)
    no_kept = a.scoring.visual_idx.new_empty(0, dtype=torch.int64)
    check_gather(a.visual_embeds, a.visual_position_ids, no_kept)


def check_prune_and_merge(a: PruneMergeArgs) -> None:
    """Static checks of ``prune_and_merge``."""
    _check_composite(a)
    check_merge(a.merge(a.scoring.visual_idx.new_empty(0, dtype=torch.int64)))


def check_prune_values(a: PruneArgs) -> list[int]:
    """The value checks of ``prune_visual_tokens`` (stage a's, then ``keep_count`` against every
    sample, the spread coordinates' order), in one device read. Returns the visual offsets
    [B+1] as Python ints."""
    bv, _, bad = _check_scoring_values(a.scoring, spread=a.spread)
    check_keep_count_values(a.keep.keep_count, bv)
    if bad:
        _detailed_spread(a.spread, a.scoring.cu_seqlens_v)
    return bv


def check_prune_merge_values(a: PruneMergeArgs) -> list[int]:
    """The value checks of ``prune_and_merge`` in one device read: stage a's, ``keep_count``,
    then the merge's (``cu_seqlens`` covers ``inputs_embeds``, ``visual_idx`` lies in each
    sequence; ``visual_idx``'s order and ``cu_seqlens_v`` are stage a's already). Returns the
    visual offsets."""
    bv, bl, bad = _check_scoring_values(a.scoring, a.cu_seqlens, a.spread)
    check_keep_count_values(a.keep.keep_count, bv)
    check_offsets("cu_seqlens", bl, a.inputs_embeds.shape[0], "inputs_embeds.shape[0]")
    if bad:
        _detailed_merge_positions(a.scoring.visual_idx, a.scoring.cu_seqlens_v, None, bl)
        _detailed_spread(a.spread, a.scoring.cu_seqlens_v)
    return bv


_MAPPER_BLOCK_PARAMS = ("dw.weight", "dw.bias", "pw.weight", "pw.bias", "norm.weight", "norm.bias")


def mapper_param_names(num_blocks: int) -> list[str]:
    """Stable names of the flat mapper parameters, in the op's order.

    ``blocks.{i}.dw.weight``, ``blocks.{i}.dw.bias``, ``blocks.{i}.pw.weight``,
    ``blocks.{i}.pw.bias``, ``blocks.{i}.norm.weight``, ``blocks.{i}.norm.bias`` for each block
    ``i``, then ``head.weight`` and ``head.bias``: the keys of ``TokenMapper``'s ``state_dict`` and
    of the ``.safetensors`` files ``save_mapper`` writes.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
    names = [f"blocks.{i}.{suffix}" for i in range(num_blocks) for suffix in _MAPPER_BLOCK_PARAMS]
    return [*names, "head.weight", "head.bias"]


def check_kernel_size(kernel_size: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size}")


def validate_mapper_params(
    params: Sequence[torch.Tensor], kernel_size: int, in_channels: int = 1
) -> tuple[int, ...]:
    """Check a flat mapper parameter list and return its block widths ``(C_1, ..., C_last)``.

    Raises ``ValueError`` naming the parameter (index and name) and the expected shape when the
    list has the wrong length, a tensor has the wrong shape (channels must chain from
    ``in_channels`` input channels; the depthwise kernel width must equal ``kernel_size``) or the
    tensors are not all on one device, and ``TypeError`` when an entry is not a float32 tensor.
    """
    check_kernel_size(kernel_size)
    if isinstance(params, torch.Tensor) or not isinstance(params, Sequence):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    per_block = len(_MAPPER_BLOCK_PARAMS)
    count = len(params)
    if count < per_block + 2 or (count - 2) % per_block != 0:
        raise ValueError(
            f"params must hold {per_block} tensors per block plus 2 for the head "
            f"(6 * num_blocks + 2 with num_blocks >= 1, e.g. 32 for 5 blocks), got {count}"
        )
    num_blocks = (count - 2) // per_block
    names = mapper_param_names(num_blocks)

    for index, (name, p) in enumerate(zip(names, params, strict=True)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{index}] ({name}) must be a Tensor, got {type(p).__name__}")
        if p.dtype != torch.float32:
            raise TypeError(f"params[{index}] ({name}) must be float32, got {p.dtype}")
    device = params[0].device
    for index, (name, p) in enumerate(zip(names, params, strict=True)):
        if p.device != device:
            raise ValueError(
                f"params[{index}] ({name}) is on {p.device}, expected {device} like params[0]"
            )

    def expect(index: int, shape: tuple[int, ...]) -> None:
        got = tuple(params[index].shape)
        if got != shape:
            raise ValueError(
                f"params[{index}] ({names[index]}) must have shape {list(shape)}, got {list(got)}"
            )

    widths: list[int] = []
    c_in = in_channels
    for block in range(num_blocks):
        base = block * per_block
        dw_shape = tuple(params[base].shape)
        if len(dw_shape) != 3 or dw_shape[1] != 1 or dw_shape[0] != c_in:
            expect(base, (c_in, 1, kernel_size))
        if dw_shape[2] != kernel_size:
            raise ValueError(
                f"params[{base}] ({names[base]}) has kernel width {dw_shape[2]} but "
                f"kernel_size={kernel_size}: expected shape {[c_in, 1, kernel_size]}"
            )
        expect(base + 1, (c_in,))
        pw_shape = tuple(params[base + 2].shape)
        if len(pw_shape) != 2 or pw_shape[1] != c_in or pw_shape[0] < 1:
            raise ValueError(
                f"params[{base + 2}] ({names[base + 2]}) must have shape [C_out, {c_in}] "
                f"with C_out >= 1, got {list(pw_shape)}"
            )
        c_out = pw_shape[0]
        for offset in (3, 4, 5):
            expect(base + offset, (c_out,))
        widths.append(c_out)
        c_in = c_out
    expect(count - 2, (1, c_in))
    expect(count - 1, (1,))
    return tuple(widths)


def check_mapper_config(
    params: Sequence[torch.Tensor],
    kernel_size: int,
    input_eps: float,
    device: torch.device,
    in_channels: int = 1,
) -> None:
    """The mapper's parameters (see :func:`validate_mapper_params`), kernel size and epsilon."""
    if isinstance(input_eps, bool) or not isinstance(input_eps, numbers.Real):
        raise TypeError(f"input_eps must be a float, got {type(input_eps).__name__}")
    if not (math.isfinite(input_eps) and input_eps > 0):
        _fail(f"input_eps must be a finite float > 0, got {input_eps!r}")
    validate_mapper_params(params, kernel_size, in_channels)
    if params[0].device != device:
        _fail(f"params must be on the device of attn ({device}), got {params[0].device}")


def check_mapper(
    attn: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    params: Sequence[torch.Tensor],
    kernel_size: int,
    input_eps: float,
    grid: torch.Tensor | None = None,
) -> None:
    """Ranks, dtypes and devices of ``mapper_forward``'s arguments; the first block of ``params``
    takes ``attn``'s channels (1 for ``[Tv]``, ``C`` for ``[Tv, C]``) plus 2 with ``grid``."""
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a Tensor, got {type(attn).__name__}")
    if attn.dtype != torch.float32:
        raise TypeError(f"attn must be float32, got {attn.dtype}")
    check_rank("attn", attn, (1, 2), "[total_v] or [total_v, channels]")
    if attn.dim() == 2 and attn.shape[1] < 1:
        _fail(f"attn [total_v, channels] must have channels >= 1, got shape {tuple(attn.shape)}")
    if not isinstance(cu_seqlens_v, torch.Tensor):
        raise TypeError(f"cu_seqlens_v must be a Tensor, got {type(cu_seqlens_v).__name__}")
    check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    in_channels = 1 if attn.dim() == 1 else attn.shape[1]
    if grid is not None:
        if not isinstance(grid, torch.Tensor):
            raise TypeError(f"grid must be a Tensor or None, got {type(grid).__name__}")
        if grid.dtype != torch.float32:
            raise TypeError(f"grid must be float32, got {grid.dtype}")
        require(
            tuple(grid.shape) == (attn.shape[0], 2),
            f"grid must be [total_v, 2] = [{attn.shape[0]}, 2] (normalised row, column), got "
            f"shape {tuple(grid.shape)}",
        )
        check_same_device(attn=attn, grid=grid)
        in_channels += 2
    check_mapper_config(params, kernel_size, input_eps, attn.device, in_channels)
    check_same_device(attn=attn, cu_seqlens_v=cu_seqlens_v)


def check_mapper_values(
    attn: torch.Tensor, cu_seqlens_v: torch.Tensor, grid: torch.Tensor | None = None
) -> None:
    """Offsets cover ``attn`` [Tv] or [Tv, C] float32; attention values are >= 0 (the log input
    would turn a negative one into NaN); ``grid`` [Tv, 2], when given, is finite. NaN attention
    itself passes: it ranks lowest, as the contract says. One device read."""
    masks = [attn < 0] if attn.numel() > 0 else []
    if grid is not None and grid.numel() > 0:
        masks.append(~torch.isfinite(grid))
    (bv,), bad = read_values([cu_seqlens_v], masks)
    check_offsets("cu_seqlens_v", bv, attn.shape[0], "attn.shape[0]")
    if bad:  # name the first bad entry (more reads, on the failure path only)
        if bool((attn < 0).any()):
            i = tuple(int(x) for x in torch.nonzero(attn < 0)[0])
            at = ", ".join(map(str, i))
            _fail(f"attn must be >= 0 (attention probabilities), got attn[{at}] = {float(attn[i])}")
        i = tuple(int(x) for x in torch.nonzero(~torch.isfinite(grid))[0])
        _fail(f"grid must be finite, got grid[{i[0]}, {i[1]}] = {float(grid[i])}")


def spread_args(coords: Any, radius: Any) -> tuple[torch.Tensor | None, int]:
    """``spread_coords`` and ``spread_radius`` as the op's schema takes them, checked by the
    Python wrappers before the call (the schema's own cast error names neither): TypeError
    unless the coordinates are a Tensor or None and the radius an integer (``int``, a numpy
    integer; not bool), returned as a Python int. The rest is :func:`check_spread`'s."""
    if coords is not None and not isinstance(coords, torch.Tensor):
        raise TypeError(f"spread_coords must be a Tensor or None, got {type(coords).__name__}")
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral):
        raise TypeError(f"spread_radius must be an int, got {type(radius).__name__}")
    return coords, int(radius)


def check_spread(spread: SpreadRule, total_v: int | torch.SymInt, device: torch.device) -> None:
    """``spread_coords`` / ``spread_radius`` (:class:`SpreadRule`): the radius an int in
    ``[0, MAX_SPREAD_RADIUS]``, > 0 only with coords; the coords None or a [total_v, 3]
    int32/int64 tensor on ``device`` (the device of the scores / queries)."""
    coords, radius = spread
    if isinstance(radius, bool) or not isinstance(radius, int):
        raise TypeError(f"spread_radius must be an int, got {type(radius).__name__}")
    if not 0 <= radius <= MAX_SPREAD_RADIUS:
        _fail(f"spread_radius must be an int in [0, {MAX_SPREAD_RADIUS}], got {radius}")
    if coords is None:
        if radius > 0:
            _fail(
                f"spread_radius = {radius} needs spread_coords (the visual tokens' [total_v, 3] "
                "(segment, row, col)); pass them, or spread_radius = 0"
            )
        return
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"spread_coords must be a Tensor or None, got {type(coords).__name__}")
    check_rank("spread_coords", coords, 2, "[total_v, 3] (segment, row, col)")
    check_dtype("spread_coords", coords, INDEX_DTYPES)
    require(
        coords.shape[0] == total_v and coords.shape[1] == 3,
        f"spread_coords must be [total_v, 3] = [{total_v}, 3] (segment, row, col), got shape "
        f"{tuple(coords.shape)}",
    )
    if coords.device != device:
        _fail(f"spread_coords must be on the device of the scores ({device}), got {coords.device}")


def _spread_masks(spread: SpreadRule, cu: torch.Tensor) -> list[torch.Tensor]:
    """Device mask of the rule "``spread_coords`` strictly increase, lexicographically, within
    each sample" (its sample by a binary search over the inner offsets: no out-of-range index
    on invalid offsets, whose own check comes first)."""
    coords = spread.coords
    if coords is None or coords.shape[0] < 2 or cu.shape[0] < 2:
        return []
    c = coords.to(torch.int64)
    rows = torch.arange(1, c.shape[0], device=cu.device, dtype=cu.dtype)
    inner = cu[1:-1].contiguous()
    same = torch.searchsorted(inner, rows, right=True) == torch.searchsorted(
        inner, rows - 1, right=True
    )
    a, b = c[:-1], c[1:]
    eq, gt = a == b, b > a
    above = gt[:, 0] | (eq[:, 0] & (gt[:, 1] | (eq[:, 1] & gt[:, 2])))
    return [same & ~above]


def _detailed_spread(spread: SpreadRule, cu: torch.Tensor) -> None:
    """The coords' order rule again, naming the first offending pair (failure path only)."""
    masks = _spread_masks(spread, cu)
    if not masks or not bool(masks[0].any()):
        return
    i = int(torch.nonzero(masks[0])[0]) + 1
    c = spread.coords
    prev, here = tuple(c[i - 1].tolist()), tuple(c[i].tolist())
    inner = [int(x) for x in cu[1:-1].tolist()]
    b = sum(1 for x in inner if x <= i)  # the sample of row i
    _fail(
        "spread_coords must be strictly increasing in lexicographic (segment, row, col) order "
        f"within each sample (raster order), got spread_coords[{i - 1}] = {prev} >= "
        f"spread_coords[{i}] = {here} in sample {b}"
    )


def check_select(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep: KeepRule,
    relevance: str = "softmax",
    spread: SpreadRule = NO_SPREAD,
) -> None:
    check_rank("scores", scores, 1, "[total_v]")
    check_dtype("scores", scores, FLOAT_DTYPES)
    check_cu_seqlens("cu_seqlens_v", cu_seqlens_v)
    check_keep(*keep)
    check_relevance(relevance)
    check_same_device(scores=scores, cu_seqlens_v=cu_seqlens_v)
    check_spread(spread, scores.shape[0], scores.device)


def check_select_values(
    scores: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    keep: KeepRule,
    relevance: str = "softmax",
    spread: SpreadRule = NO_SPREAD,
) -> list[int]:
    """Offsets cover ``scores`` [Tv]; ``keep_count`` fits every non-empty sample; with
    ``keep_mass`` and ``relevance="normalize"``, every score is finite and >= 0 (or NaN); the
    spread coordinates, when given, strictly increase within each sample. One device read;
    returns the offsets [B+1] as Python ints."""
    masses = keep.keep_mass is not None and relevance == "normalize" and scores.numel() > 0
    masks = [(scores < 0) | torch.isinf(scores)] if masses else []
    (bv,), bad = read_values([cu_seqlens_v], masks + _spread_masks(spread, cu_seqlens_v))
    check_offsets("cu_seqlens_v", bv, scores.shape[0], "scores.shape[0]")
    check_keep_count_values(keep.keep_count, bv)
    if bad:  # name the first offending entry (more reads, on the failure path only)
        if masks and bool(masks[0].any()):
            i = int(torch.nonzero(masks[0])[0])
            _fail(
                "scores must be finite and >= 0 (or NaN) with keep_mass and relevance='normalize' "
                f"(they are masses, normalised per sample), got scores[{i}] = {float(scores[i])}"
            )
        _detailed_spread(spread, cu_seqlens_v)
    return bv


def check_gather(
    visual_embeds: torch.Tensor, position_ids: torch.Tensor, kept_idx: torch.Tensor
) -> None:
    check_rank("visual_embeds", visual_embeds, 2, "[total_v, hidden]")
    check_dtype("visual_embeds", visual_embeds, FLOAT_DTYPES)
    _check_position_ids(position_ids, visual_embeds.shape[0], "total_v", "visual token")
    _check_kept_idx(kept_idx)
    check_same_device(visual_embeds=visual_embeds, position_ids=position_ids, kept_idx=kept_idx)


def _check_position_ids(position_ids: torch.Tensor, n: int, axis: str, per: str) -> None:
    """[axis] or [rows, axis] int32/int64 position ids with ``n`` columns, one per ``per``."""
    check_rank("position_ids", position_ids, (1, 2), f"[{axis}] or [rows, {axis}]")
    check_dtype("position_ids", position_ids, INDEX_DTYPES)
    require(
        position_ids.shape[-1] == n,
        f"position_ids must have one column per {per} ({n}), got shape {tuple(position_ids.shape)}",
    )


def _check_kept_idx(kept_idx: torch.Tensor) -> None:
    check_rank("kept_idx", kept_idx, 1, "[total_kept] global visual indices")
    if kept_idx.dtype != torch.int64:
        raise TypeError(f"kept_idx must be int64, got {kept_idx.dtype}")


def check_kept_idx_values(kept_idx: torch.Tensor, total_v: int) -> None:
    """``kept_idx`` [Tkept] int64 indexes ``total_v`` visual tokens (one device read)."""
    if kept_idx.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(kept_idx)).tolist()
    if lo < 0 or hi >= total_v:
        bad = lo if lo < 0 else hi
        _fail(f"kept_idx must index the {total_v} visual tokens, got an entry {bad}")


def check_merge(a: MergeArgs) -> None:
    """Ranks, dtypes, sizes and devices of ``merge_kept``'s arguments."""
    inputs_embeds, position_ids, cu_seqlens, visual_embeds, visual_idx, cu_seqlens_v, kept_idx = a
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
    _check_position_ids(position_ids, inputs_embeds.shape[0], "total_len", "sequence token")
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
    _check_kept_idx(kept_idx)
    check_same_device(**a._asdict())


def check_merge_values(a: MergeArgs) -> None:
    """The merge's value checks in one device read: offsets cover their tensors, ``visual_idx``
    lies in each sequence and increases strictly within a sample, ``kept_idx`` indexes the
    visual tokens and increases strictly."""
    inputs_embeds, _, cu_seqlens, _, visual_idx, cu_seqlens_v, kept_idx = a
    masks = _position_masks(visual_idx, cu_seqlens_v, _lengths(cu_seqlens), increasing=True)
    masks += _kept_masks(kept_idx, visual_idx.shape[0])
    (bl, bv), bad = read_values([cu_seqlens, cu_seqlens_v], masks)
    check_offsets("cu_seqlens", bl, inputs_embeds.shape[0], "inputs_embeds.shape[0]")
    check_offsets("cu_seqlens_v", bv, visual_idx.shape[0], "visual_idx.shape[0]")
    if bad:
        _detailed_merge_positions(visual_idx, cu_seqlens_v, kept_idx, bl)


def _detailed_merge_positions(
    visual_idx: torch.Tensor,
    cu_seqlens_v: torch.Tensor,
    kept_idx: torch.Tensor | None,
    bl: list[int],
) -> None:
    """The merge's index rules one at a time, naming the first offending entry (several device
    reads: run only once the offsets passed and a device mask found something wrong)."""
    lengths = [bl[b + 1] - bl[b] for b in range(len(bl) - 1)]
    check_visual_idx_values(visual_idx, cu_seqlens_v, lengths, "sequence")
    if kept_idx is None:
        return
    check_kept_idx_values(kept_idx, visual_idx.shape[0])
    if kept_idx.numel() > 1:
        not_increasing = kept_idx[1:] <= kept_idx[:-1]
        if bool(not_increasing.any()):
            i = int(torch.nonzero(not_increasing)[0]) + 1
            _fail(
                f"kept_idx must be strictly increasing (as select_topk returns it), got "
                f"kept_idx[{i - 1}] = {int(kept_idx[i - 1])} >= kept_idx[{i}] = {int(kept_idx[i])}"
            )
