"""Device->host reads per op call: each public op validates with ONE batched read.

A read (``.tolist()``, ``.item()``, ``bool(t)``, ``int(t)``...) of a CUDA tensor stalls the host
until the GPU queue drains, and so does a blocking upload of host data (``torch.tensor(data,
device=...)``), so the count is pinned here: every such method of ``torch.Tensor`` and both
factories are wrapped with a counter for the duration of one call. On the CPU the reads are cheap but the count
is the same code path, so the CPU runs guard against a regression too. Where the plain-PyTorch
reference runs stage a (backend ``ref``), ``instruction_attention_ref`` adds its own 3 reads of
the offsets; the Triton, C++ and CUDA backends add none. On a GPU the Triton and CUDA cases also
run under ``torch.cuda.set_sync_debug_mode``, which sees every synchronising call, including
blocking host->device copies and reads inside C++ that the counter cannot see; and the CUDA
stages of ``prune_and_merge`` are captured in a CUDA graph (which fails on any synchronisation).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch

import tokenprune_kernels as tp
from tokenprune_kernels import _extension, backend, reference
from tokenprune_kernels.mapper import MapperConfig, TokenMapper
from tokenprune_kernels.ops.select import keep_counts_from_bounds, keep_counts_host
from tokenprune_kernels.testing import backend_params, make_inputs

READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__")
UPLOAD_FACTORIES = ("tensor", "as_tensor")

#: The validation's one read, plus instruction_attention_ref's 3 where the reference runs stage a.
REF_LIMITS = {
    "instruction_attention": 4,
    "instruction_attention_heads": 4,
    "prune_visual_tokens": 4,
    "prune_and_merge": 4,
}
LIMITS = {
    "ref": REF_LIMITS,
    "cpp": {},  # every op: 1
    "cuda": {},  # every op: 1
    "triton": {},  # every op: 1
}

CASES = [
    "instruction_attention",
    "instruction_attention[q_pos]",
    "instruction_attention_heads[q_pos]",
    "mapper_forward[mapper]",
    "mapper_forward[mapper,inference]",
    "select_topk[ratio]",
    "select_topk[count]",
    "select_topk[mass]",
    "mass_keep_counts",
    "gather_kept",
    "merge_kept",
    "prune_visual_tokens[mapper]",
    "prune_visual_tokens[q_pos,count]",
    "prune_and_merge",
    "prune_and_merge[q_pos,count,mapper]",
    "prune_and_merge[mapper,inference]",
    "prune_visual_tokens[mass,mapper]",
    "prune_and_merge[mass]",
    "select_topk[spread]",
    "select_topk[mass,spread]",
    "prune_visual_tokens[spread,mapper]",
    "prune_and_merge[q_pos,count,spread]",
]
#: The adaptive rule (keep_mass) reads the total of its device-computed counts: one more read.
ADAPTIVE_READS = 1
#: The spread rule's order check rides in the validation's one read: no read of its own. Where
#: stage spread_select runs the reference (no compiled kernel for it here),
#: ``spread_suppressed_ref`` reads the keys, the coordinates and the offsets, and uploads its
#: mask (a Python loop): 4 more.
SPREAD_REF_READS = 4


def _variants(case: str) -> list[str]:
    return case.split("[", 1)[1].rstrip("]").split(",") if "[" in case else []


def limit_of(backend_name: str, case: str, device: str = "cpu") -> int:
    extra = ADAPTIVE_READS if "mass" in _variants(case) else 0
    if "spread" in _variants(case):
        with backend.use_backend(backend_name):
            on_ref = backend.choose("spread_select", device) == "ref"
        extra += SPREAD_REF_READS if on_ref else 0
    return LIMITS[backend_name].get(case.split("[")[0], 1) + extra


@contextlib.contextmanager
def count_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Inside the block, every call of a ``torch.Tensor`` method that reads data to the host
    appends its name to the yielded list, and so does every blocking upload of host data: a
    ``torch.tensor(data, device=...)`` / ``torch.as_tensor(data, device=...)`` (a pageable
    host->device copy, which waits for the stream on CUDA; the sync-free way is a pinned host
    tensor copied with ``non_blocking=True``)."""
    calls: list[str] = []

    def counted(name: str, method: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return method(self, *args, **kwargs)

        return wrapper

    def uploads(name: str, factory: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if kwargs.get("device") is not None:
                calls.append(f"torch.{name}(device=)")
            return factory(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in READ_METHODS:
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        for name in UPLOAD_FACTORIES:
            patch.setattr(torch, name, uploads(name, getattr(torch, name)))
        yield calls


def _layout(rng: random.Random) -> list[list[tuple[str, int]]]:
    """Three samples of awkward sizes, one without visual tokens."""
    return [
        [("t", rng.randint(1, 5)), ("v", rng.randint(9, 23)), ("q", rng.randint(2, 5))],
        [("t", 2), ("q", rng.randint(1, 3)), ("t", 1)],
        [("v", rng.randint(5, 17)), ("t", 1), ("q", rng.randint(1, 4)), ("t", rng.randint(1, 3))],
    ]


def _call(case: str, gen: torch.Generator, device: str) -> Callable[[], object]:
    """A no-argument call of one public op on fresh inputs (int32 offsets for the variants)."""
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    variant = "[" in case
    inp = make_inputs(
        _layout(rng), index_dtype=torch.int32 if variant else torch.int64, generator=gen
    ).to(device)
    q_pos = inp.q_pos if "q_pos" in case else None
    keep = {"keep_count": 1} if "count" in case else {"keep_ratio": 0.37}
    if "mass" in _variants(case):
        keep = {"keep_mass": 0.6, "min_keep_ratio": 0.1, "max_keep_ratio": 0.9}
    if "spread" in _variants(case):  # each sample's visual tokens on a grid 3 tokens wide
        bounds = inp.cu_seqlens_v.tolist()
        local = torch.cat([torch.arange(bounds[b + 1] - bounds[b]) for b in range(len(bounds) - 1)])
        coords = torch.stack([torch.zeros_like(local), local // 3, local % 3], 1).to(device)
        keep = {**keep, "spread_coords": coords, "spread_radius": 1}
    op = case.split("[")[0]
    params: list[torch.Tensor] = []
    if "mapper" in case:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        mapper = TokenMapper(MapperConfig(channels=(2, 4)))
        params = [p.detach().to(device) for p in mapper.op_params()]
        if "inference" in case:  # parameters made under inference mode: no version counter
            with torch.inference_mode():
                params = [p.clone() for p in params]
    tv = inp.visual_idx.shape[0]
    scores = torch.rand(tv, generator=gen).to(device)
    kept = torch.sort(torch.randperm(tv, generator=gen)[: tv // 2]).values.to(device)
    scoring = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k)
    if op == "instruction_attention":
        return lambda: tp.instruction_attention(
            *scoring, inp.visual_idx, inp.cu_seqlens_v, q_pos=q_pos
        )
    if op == "instruction_attention_heads":  # Hq 4, Hk 2: one channel per query head
        return lambda: tp.instruction_attention_heads(
            *scoring, inp.visual_idx, inp.cu_seqlens_v, q_pos=q_pos, head_groups=4
        )
    if op == "mapper_forward":
        return lambda: tp.mapper_forward(scores, inp.cu_seqlens_v, params)
    if op == "select_topk":
        return lambda: tp.select_topk(scores, inp.cu_seqlens_v, **keep)
    if op == "mass_keep_counts":
        return lambda: tp.mass_keep_counts(scores, inp.cu_seqlens_v, 0.6, 0.1, 0.9, "normalize")
    if op == "gather_kept":
        return lambda: tp.gather_kept(inp.visual_embeds, inp.visual_position_ids, kept)
    if op == "merge_kept":
        return lambda: tp.merge_kept(
            inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds,
            inp.visual_idx, inp.cu_seqlens_v, kept,
        )  # fmt: skip
    if op == "prune_visual_tokens":
        return lambda: tp.prune_visual_tokens(
            *scoring, inp.visual_idx, inp.cu_seqlens_v, inp.visual_embeds,
            inp.visual_position_ids, params, q_pos=q_pos, **keep,
        )  # fmt: skip
    assert op == "prune_and_merge"
    return lambda: tp.prune_and_merge(
        *scoring, inp.inputs_embeds, inp.position_ids, inp.cu_seqlens, inp.visual_embeds,
        inp.visual_idx, inp.cu_seqlens_v, params, q_pos=q_pos, **keep,
    )  # fmt: skip


@pytest.mark.parametrize(("backend_name", "device"), backend_params("prune_and_merge"))
@pytest.mark.parametrize("case", CASES)
def test_one_call_reads_the_device_at_most_once(monkeypatch, gen, backend_name, device, case):
    call = _call(case, gen, device)
    limit = limit_of(backend_name, case, device)
    with backend.use_backend(backend_name), torch.no_grad():
        call()  # warm-up (a GPU's first Triton call compiles and autotunes)
        with count_reads(monkeypatch) as reads:
            call()
    assert len(reads) <= limit, f"{case} on {backend_name}: {len(reads)} reads {reads}"
    assert len(reads) >= 1  # the offsets are read (the counter works)


@pytest.mark.cuda
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.parametrize("case", CASES)
def test_gpu_call_synchronises_at_most_once(gen, case, backend_name):
    """torch's own sync detector: the one read (two with keep_mass: the counts' total), and no
    blocking host->device copy either."""
    if not backend.implemented("select_topk", backend_name, "cuda"):
        pytest.skip(f"{backend_name} does not run select_topk on a GPU here")
    call = _call(case, gen, "cuda")
    with backend.use_backend(backend_name), torch.no_grad():
        call()
        call()
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    limit = limit_of(backend_name, case, "cuda")
    assert len(syncs) <= limit, [f"{w.filename}:{w.lineno}" for w in syncs]


# ------------------------------------------------------------------ keep counts on the host


def test_host_keep_counts_match_the_reference(gen):
    """The counts computed from the host offsets are keep_counts_ref's, and their sum is
    keep_total_host's, for awkward sizes and ratios (round-half-up boundaries included)."""
    for _ in range(30):
        b = int(torch.randint(1, 9, (1,), generator=gen))
        n = torch.randint(0, 300, (b,), generator=gen)
        n[torch.rand(b, generator=gen) < 0.2] = 0
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(n, 0)])
        bounds = cu.tolist()
        ratios = [float(torch.rand(1, generator=gen)), 0.5, 0.25, 0.125, 1.0, 1e-9]
        ratios.append(float(torch.randint(1, 8, (1,), generator=gen)) / 16)
        keeps = [{"keep_ratio": r} for r in ratios] + [{"keep_count": 1}, {"keep_count": 3}]
        for keep in keeps:
            want = reference.keep_counts_ref(cu, **keep)
            got = keep_counts_host(bounds, **keep)
            assert got == want.tolist(), (bounds, keep)
            assert sum(got) == reference.keep_total_host(bounds, **keep)
            tensor, total = keep_counts_from_bounds(bounds, cu.device, **keep)
            assert tensor.dtype == torch.int64 and torch.equal(tensor, want)
            assert total == sum(got)


# --------------------------------------------- the batched checks catch what the detailed do


def _random_layout(gen: torch.Generator) -> list[list[tuple[str, int]]]:
    layouts = []
    for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
        nv = int(torch.randint(0, 9, (1,), generator=gen))
        layouts.append([("t", 1), ("v", nv), ("q", 2), ("t", 1)])
    return layouts


def _positions_ok(idx: list[int], bounds: list[int], limits: list[int], increasing: bool) -> bool:
    for b in range(len(bounds) - 1):
        part = idx[bounds[b] : bounds[b + 1]]
        if any(x < 0 or x >= limits[b] for x in part):
            return False
        if increasing and any(y <= x for x, y in itertools.pairwise(part)):
            return False
    return True


def _corrupted_case(gen: torch.Generator) -> list[tuple[bool, Callable[[], object]]]:
    """Inputs with one random corruption (or none) and, per op, (rule holds, call)."""
    inp = make_inputs(_random_layout(gen), generator=gen)
    bq, bk = inp.cu_seqlens_q.tolist(), inp.cu_seqlens_k.tolist()
    bv, bl = inp.cu_seqlens_v.tolist(), inp.cu_seqlens.tolist()
    key_len = [bk[b + 1] - bk[b] for b in range(len(bk) - 1)]
    seq_len = [bl[b + 1] - bl[b] for b in range(len(bl) - 1)]
    vidx, q_pos = inp.visual_idx.clone(), inp.q_pos.clone()
    tv = vidx.shape[0]
    what = int(torch.randint(0, 3, (1,), generator=gen))
    if what == 0 and tv > 0:
        i = int(torch.randint(0, tv, (1,), generator=gen))
        vidx[i] = int(torch.randint(-2, max(seq_len) + 2, (1,), generator=gen))
    elif what == 1:
        i = int(torch.randint(0, q_pos.shape[0], (1,), generator=gen))
        q_pos[i] = int(torch.randint(-2, max(key_len) + 2, (1,), generator=gen))
    n_kept = int(torch.randint(0, 5, (1,), generator=gen))
    kept = torch.randint(-1, tv + 1, (n_kept,), generator=gen)
    if what == 2 or bool(torch.rand(1, generator=gen) < 0.5):
        kept = torch.sort(kept).values
    vidx_l = vidx.tolist()
    in_keys = _positions_ok(vidx_l, bv, key_len, True)
    in_keys &= _positions_ok(q_pos.tolist(), bq, key_len, False)
    in_seq = _positions_ok(vidx_l, bv, seq_len, True)
    kept_ok = _positions_ok(kept.tolist(), [0, n_kept], [tv], True)
    scoring = (inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k)
    return [
        (in_keys, functools.partial(
            tp.instruction_attention, *scoring, vidx, inp.cu_seqlens_v, q_pos)),
        (in_seq and kept_ok, functools.partial(
            tp.merge_kept, inp.inputs_embeds, inp.position_ids, inp.cu_seqlens,
            inp.visual_embeds, vidx, inp.cu_seqlens_v, kept)),
        (in_keys and in_seq, functools.partial(
            tp.prune_and_merge, *scoring, inp.inputs_embeds, inp.position_ids, inp.cu_seqlens,
            inp.visual_embeds, vidx, inp.cu_seqlens_v, keep_ratio=0.5, q_pos=q_pos)),
    ]  # fmt: skip


def test_device_masks_agree_with_the_rules(gen):
    """Random corruptions of visual_idx, q_pos and kept_idx: an op raises ValueError exactly when
    the rule (evaluated here in plain Python) is broken, so the one-read fast path lets nothing
    through that the detailed checks would catch, and flags nothing they would pass."""
    raised = passed = 0
    for _ in range(40):
        for ok, call in _corrupted_case(gen):
            if ok:
                call()
                passed += 1
            else:
                with pytest.raises(ValueError, match=r"visual_idx|q_pos|kept_idx"):
                    call()
                raised += 1
    assert raised > 10 and passed > 10  # both sides exercised


@pytest.mark.parametrize(
    "name,bad",
    [
        ("cu_seqlens_v", [0, 10**9, 5]),
        ("cu_seqlens_v", [0, -7, 99]),
        ("cu_seqlens_k", [0, 10**9, -3]),
        ("cu_seqlens_q", [0, 10**9, 2]),
        ("cu_seqlens", [5, -(10**9), 10**9]),
    ],
)
def test_garbage_offsets_fail_on_the_offsets_not_in_the_masks(name, bad):
    """The device masks run before the offsets are checked: garbage offsets must still give the
    offsets' own error, never an indexing error from the masks."""
    inp = make_inputs([[("t", 2), ("v", 7), ("q", 3)], [("t", 1), ("v", 4), ("q", 2)]])
    args = dict(
        q=inp.q, k=inp.k, cu_seqlens_q=inp.cu_seqlens_q, cu_seqlens_k=inp.cu_seqlens_k,
        inputs_embeds=inp.inputs_embeds, position_ids=inp.position_ids, cu_seqlens=inp.cu_seqlens,
        visual_embeds=inp.visual_embeds, visual_idx=inp.visual_idx, cu_seqlens_v=inp.cu_seqlens_v,
        q_pos=inp.q_pos, keep_ratio=0.5,
    )  # fmt: skip
    args[name] = torch.tensor(bad)
    with pytest.raises(ValueError, match=rf"{name} must"):
        tp.prune_and_merge(**args)
    if name != "cu_seqlens":
        with pytest.raises(ValueError, match=rf"{name} must"):
            tp.instruction_attention(
                args["q"], args["k"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                args["visual_idx"], args["cu_seqlens_v"], args["q_pos"],
            )  # fmt: skip
    if name in ("cu_seqlens", "cu_seqlens_v"):
        with pytest.raises(ValueError, match=rf"{name} must"):
            tp.merge_kept(
                args["inputs_embeds"], args["position_ids"], args["cu_seqlens"],
                args["visual_embeds"], args["visual_idx"], args["cu_seqlens_v"],
                torch.tensor([0, 3]),
            )  # fmt: skip


def test_prune_and_merge_checks_visual_idx_against_the_sequence_too():
    """The single mask of prune_and_merge bounds visual_idx by the key AND the sequence length:
    a sequence shorter than its keys is caught with the merge's message."""
    inp = make_inputs([[("t", 2), ("v", 7), ("q", 3)], [("t", 1), ("v", 4), ("q", 2)]])
    cu_seqlens = torch.tensor([0, 8, 15])  # sample 0: 8 rows, but its visual_idx reach 8
    with pytest.raises(
        ValueError, match=r"visual_idx\[6\] = 8 is outside sample 0's sequence \[0, 8\)"
    ):
        tp.prune_and_merge(
            inp.q, inp.k, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.inputs_embeds[:15],
            inp.position_ids[:, :15], cu_seqlens, inp.visual_embeds, inp.visual_idx,
            inp.cu_seqlens_v, keep_ratio=0.5,
        )  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("use_mapper", [False, True], ids=["raw_attention", "mapper"])
def test_cuda_prune_and_merge_captures_in_a_cuda_graph(gen, use_mapper):
    """What prune_and_merge runs on the CUDA backend once its inputs are validated (stage a, b,
    and the selection fused with the merge, sized by the host-known total), captured in one CUDA
    graph and replayed on new inputs copied into the captured buffers: capture fails on any
    synchronisation, and the replay equals the reference."""
    if not _extension.has_kernel("_select_merge_kept", "CUDA"):
        pytest.skip("the compiled extension has no CUDA kernels (a CPU-only build)")
    ops = torch.ops.tokenprune
    select_merge = backend.FUSED[("select_topk", "merge_kept")]["cuda"]
    layout = [[("t", 5), ("v", 301), ("t", 2), ("v", 40), ("q", 9)], [("t", 3), ("q", 2)],
              [("v", 77), ("q", 4), ("t", 1)]]  # fmt: skip
    make = functools.partial(make_inputs, layout, heads_q=8, heads_k=2, head_dim=64,
                             dtype=torch.bfloat16)  # fmt: skip
    inp = make(generator=gen).to("cuda")
    params = []
    if use_mapper:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        params = [p.detach().cuda() for p in TokenMapper(MapperConfig(channels=(4, 8))).op_params()]
    bounds = inp.cu_seqlens_v.tolist()
    counts, total = keep_counts_from_bounds(bounds, inp.q.device, keep_ratio=0.5)

    def stages():
        scores = ops._instruction_attention(
            inp.q,
            inp.k,
            inp.cu_seqlens_q,
            inp.cu_seqlens_k,
            inp.visual_idx,
            inp.cu_seqlens_v,
            inp.q_pos,
            None,
        )
        if params:
            scores = ops._mapper_forward(scores, inp.cu_seqlens_v, params, 5, 1e-4)
        merged = backend.run(
            select_merge,
            scores,
            inp.cu_seqlens_v,
            counts,
            inp.inputs_embeds,
            inp.position_ids,
            inp.cu_seqlens,
            inp.visual_embeds,
            inp.visual_idx,
            total_kept=total,
        )
        return (*merged, scores)  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        stages()  # warm-up outside the capture (allocator pools, kernel attributes)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = stages()
    fresh = make(generator=gen)  # same layout: same offsets, new values
    for name in ("q", "k", "inputs_embeds", "visual_embeds", "position_ids"):
        getattr(inp, name).copy_(getattr(fresh, name))
    graph.replay()
    torch.cuda.synchronize()
    want = reference.prune_and_merge_ref(
        fresh.q, fresh.k, fresh.cu_seqlens_q, fresh.cu_seqlens_k, fresh.inputs_embeds,
        fresh.position_ids, fresh.cu_seqlens, fresh.visual_embeds, fresh.visual_idx,
        fresh.cu_seqlens_v, [p.cpu() for p in params], keep_ratio=0.5, q_pos=fresh.q_pos,
    )  # fmt: skip
    embeds, pos, cu_out, src, kept, scores = (t.cpu() for t in out)
    torch.testing.assert_close(scores, want[5], rtol=1e-2, atol=1e-3)
    # Selection from the scores the graph computed: exactly the reference's rule.
    counts_ref = reference.keep_counts_ref(fresh.cu_seqlens_v, keep_ratio=0.5)
    kept_want, _ = reference.select_topk_ref(scores, fresh.cu_seqlens_v, counts_ref)
    assert torch.equal(kept, kept_want)
    merged = reference.merge_kept_ref(fresh.inputs_embeds, fresh.position_ids, fresh.cu_seqlens,
                                      fresh.visual_embeds, fresh.visual_idx, fresh.cu_seqlens_v,
                                      kept_want)  # fmt: skip
    for got, w in zip((embeds, pos, cu_out, src), merged, strict=True):
        assert torch.equal(got, w)
