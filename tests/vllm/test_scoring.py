"""``tokenprune_kernels.vllm.scoring`` (no vLLM needed): the packed scoring step against an
independent per-prompt computation, and the position codec."""

from __future__ import annotations

import pytest
import torch

from tokenprune_kernels.mapper import MapperConfig, TokenMapper, mapper_forward_ref
from tokenprune_kernels.vllm import VllmPruneSettings, hf_overrides, scoring, settings_from_config
from tokenprune_kernels.vllm.scoring import FLAG_SET, POSITION_LIMIT, Layer0Fns, PackedPrompts

HQ, HK, D, H = 4, 2, 8, 24


def _layer0(gen: torch.Generator) -> Layer0Fns:
    wq = torch.randn(H, HQ * D, generator=gen) * 0.6
    wk = torch.randn(H, HK * D, generator=gen) * 0.6
    g = torch.rand(H, generator=gen) + 0.5
    inv = 1.0 / (100.0 ** (torch.arange(0, D, 2).float() / D))

    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    def rotate(x, pos):
        t = x.view(x.shape[0], -1, D)
        ang = pos.float()[:, None] * inv[None]  # [T, D/2]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).reshape(x.shape)

    return Layer0Fns(
        norm=norm,
        qk=lambda h: (h @ wq, h @ wk),
        rotary=lambda pos, q, k: (rotate(q, pos), rotate(k, pos)),
        num_heads=HQ,
        num_kv_heads=HK,
        head_dim=D,
    )


def _prompts(gen, layout):
    """layout: per prompt (text before, visual, text between, instruction) row counts."""
    rows, pos, q_rows, v_rows, lens, nq, nv = [], [], [], [], [], [], []
    start = 0
    for before, nvis, between, ninstr in layout:
        length = before + nvis + between + ninstr
        rows.append(torch.randn(length, H, generator=gen))
        p = torch.arange(length) * 2 + int(torch.randint(0, 50, (1,), generator=gen))  # gaps
        pos.append(p)
        v_rows.append(torch.arange(before, before + nvis) + start)
        q_rows.append(torch.arange(length - ninstr, length) + start)
        lens.append(length)
        nq.append(ninstr)
        nv.append(nvis)
        start += length

    def cu(c):
        return torch.tensor([0, *torch.tensor(c).cumsum(0).tolist()])

    return PackedPrompts(
        embeds=torch.cat(rows),
        positions=torch.cat(pos),
        cu_seqlens=cu(lens),
        query_rows=torch.cat(q_rows),
        cu_seqlens_q=cu(nq),
        visual_rows=torch.cat(v_rows),
        cu_seqlens_v=cu(nv),
    )


def _independent(layer0: Layer0Fns, packed: PackedPrompts, keep_ratio, mapper=None):
    """Per prompt: full causal softmax of layer 0, instruction rows x visual columns, mean."""
    scores, kept = [], []
    b = packed.cu_seqlens.numel() - 1
    for i in range(b):
        s, e = packed.cu_seqlens[i : i + 2].tolist()
        x = packed.embeds[s:e]
        q, k = layer0.qk(layer0.norm(x))
        q, k = layer0.rotary(packed.positions[s:e], q, k)
        q = q.view(-1, HQ, D)
        k = k.view(-1, HK, D).repeat_interleave(HQ // HK, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        att = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        qs, qe = packed.cu_seqlens_q[i : i + 2].tolist()
        vs, ve = packed.cu_seqlens_v[i : i + 2].tolist()
        qi = packed.query_rows[qs:qe] - s
        vi = packed.visual_rows[vs:ve] - s
        a = att[:, qi][:, :, vi].mean(dim=(0, 1))
        if mapper is not None:
            c = mapper.config
            cu = torch.tensor([0, a.numel()])
            a = mapper_forward_ref(a, cu, mapper.op_params(), c.kernel_size, c.input_eps)
        n = a.numel()
        k_n = VllmPruneSettings(keep_ratio).kept_count(n)
        order = sorted(range(n), key=lambda j: (-float(a[j]), j))[:k_n]
        scores.append(a)
        kept.append(torch.tensor(sorted(order)) + vs)
    return torch.cat(scores), torch.cat(kept)


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("with_mapper", [False, True])
def test_score_and_select_matches_independent(gen, keep_ratio, with_mapper):
    layer0 = _layer0(gen)
    packed = _prompts(gen, [(3, 1, 0, 2), (5, 13, 2, 7), (1, 29, 0, 1), (2, 7, 3, 5)])
    mapper = None
    if with_mapper:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        mapper = TokenMapper(MapperConfig(channels=(4, 8), kernel_size=3)).eval()
        with torch.no_grad():
            for p in mapper.parameters():
                p.normal_(0.0, 0.5)
    scores, kept_idx, cu_kept = scoring.score_and_select(
        layer0, packed, keep_ratio=keep_ratio, mapper=mapper
    )
    want_scores, want_kept = _independent(layer0, packed, keep_ratio, mapper)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-4)
    assert torch.equal(kept_idx, want_kept)
    counts = [VllmPruneSettings(keep_ratio).kept_count(n) for n in (1, 13, 29, 7)]
    assert cu_kept.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]


@pytest.mark.parametrize("radius", [1, 2])
def test_score_and_select_spread_matches_independent(gen, radius):
    """``spread_radius``: the kept rows are the spread rule's (``spread_select_ref``) on the
    independent scores, with each prompt's (frame, row, col) written down from its layout (an
    image 4 x 5, a video of 3 frames 2 x 3 whose first two frames share t, a 1 x 1 image) and
    its M-RoPE ids made from them; 1-D positions are refused."""
    from dataclasses import replace

    from tokenprune_kernels.reference import keep_counts_ref, spread_select_ref

    base = _layer0(gen)
    items = [(1, 4, 5, (7, 7, 7)), (3, 2, 3, (30, 30, 31)), (1, 1, 1, (50,))]  # frames, h, w, t
    packed = _prompts(gen, [(3, 20, 0, 2), (2, 18, 1, 3), (1, 1, 0, 1)])
    pos = torch.stack([packed.positions] * 3)
    coords, frame = [], 0
    for i, (frames, h, w, ts) in enumerate(items):
        vs, ve = packed.cu_seqlens_v[i : i + 2].tolist()
        rows = packed.visual_rows[vs:ve]
        thw = [(ts[f], 100 + r, 200 + c) for f in range(frames) for r in range(h) for c in range(w)]
        pos[:, rows] = torch.tensor(thw).T
        coords += [(frame + f, r, c) for f in range(frames) for r in range(h) for c in range(w)]
        frame += frames
    mrope = replace(packed, positions=pos)
    layer0 = replace(base, rotary=lambda p, q, k: base.rotary(p[0], q, k))
    scores, kept_idx, cu_kept = scoring.score_and_select(
        layer0, mrope, keep_ratio=0.3, spread_radius=radius
    )
    want_scores, plain = _independent(base, replace(packed, positions=pos[0]), 0.3)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-4)
    counts = keep_counts_ref(packed.cu_seqlens_v, keep_ratio=0.3)
    want, want_cu = spread_select_ref(
        scores, packed.cu_seqlens_v, counts, torch.tensor(coords), radius
    )
    assert torch.equal(kept_idx, want) and torch.equal(cu_kept, want_cu)
    assert not torch.equal(kept_idx, plain)  # the rule changed the kept rows
    with pytest.raises(ValueError, match=r"spread_radius > 0 needs \[3, T\] M-RoPE"):
        scoring.score_and_select(base, packed, keep_ratio=0.3, spread_radius=radius)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_positions_round_trip_exactly(gen, dtype):
    n = 11
    emb = torch.randn(n, 2 * H, generator=gen).to(dtype)[:, ::2]  # non-contiguous
    pos = torch.randint(0, POSITION_LIMIT, (3, n), generator=gen)
    pos[:, 0] = POSITION_LIMIT - 1
    pos[:, 1] = 0
    carried = scoring.encode_positions(emb, pos, FLAG_SET)
    assert carried.shape == (n, H + scoring.position_channels(3)) and carried.dtype == dtype
    # a slice, as a prefill chunk takes
    back, flags, got = scoring.decode_positions(carried[3:7], H, 3)
    assert torch.equal(back, emb[3:7])
    assert torch.equal(got, pos[:, 3:7])
    assert torch.equal(flags, torch.full((4,), FLAG_SET))
    assert torch.equal(scoring.decode_positions(carried, H, 3)[2], pos)


def test_position_codec_errors():
    emb = torch.zeros(2, H)
    with pytest.raises(ValueError, match="position ids must be in"):
        scoring.encode_positions(emb, torch.full((3, 2), POSITION_LIMIT), FLAG_SET)
    with pytest.raises(ValueError, match=r"positions must be \[R, 2\]"):
        scoring.encode_positions(emb, torch.zeros(3, 5, dtype=torch.int64), FLAG_SET)
    with pytest.raises(ValueError, match="hidden 24"):
        scoring.decode_positions(emb, H, 3)


class _Config:
    pass


def test_settings(tmp_path):
    cfg = _Config()
    cfg.tokenprune = hf_overrides(0.25)["tokenprune"]
    assert settings_from_config(cfg) == VllmPruneSettings(keep_ratio=0.25)
    cfg.tokenprune = hf_overrides(0.25, spread_radius=2)["tokenprune"]
    assert settings_from_config(cfg) == VllmPruneSettings(keep_ratio=0.25, spread_radius=2)
    assert [VllmPruneSettings(0.25).kept_count(n) for n in (0, 1, 2, 6, 24)] == [0, 1, 1, 2, 6]
    for bad, msg in [
        (None, "has no 'tokenprune' settings"),
        ({"keep_ratio": 0}, r"keep_ratio must be in \(0, 1\], got 0"),
        ({"keep_ratio": 1.5}, r"got 1.5"),
        ({"keep_ratio": True}, r"got True"),
        ({"keep_ratio": 0.5, "mapper": str(tmp_path / "m.safetensors")}, "mapper file not found"),
        ({"keep_ratio": 0.5, "mapper": "m.pt"}, "must be a path to a .safetensors"),
        ({"keep_ratio": 0.5, "ratio": 1}, r"unknown settings \['ratio'\]"),
        ({"keep_ratio": 0.5, "spread_radius": -1}, r"spread_radius must be an int in \[0, 64\]"),
        ({"keep_ratio": 0.5, "spread_radius": 65}, r"got 65"),
        ({"keep_ratio": 0.5, "spread_radius": 1.0}, r"spread_radius must be an int"),
        ({"keep_ratio": 0.5, "spread_radius": True}, r"got True"),
        (
            {"keep_mass": 0.9},
            r"keep_mass \(the adaptive keep budget\) is not supported by the vLLM",
        ),
        (
            {"keep_ratio": 0.5, "max_keep_ratio": 0.5, "min_keep_ratio": 0.1},
            r"max_keep_ratio, min_keep_ratio \(the adaptive keep budget\) is not supported",
        ),
    ]:
        cfg.tokenprune = bad
        with pytest.raises(ValueError, match=msg):
            settings_from_config(cfg)
    with pytest.raises(ValueError, match="architecture must be one of"):
        hf_overrides(0.5, architecture="LlavaForConditionalGeneration")


def test_package_imports_without_vllm():
    import importlib.util

    import tokenprune_kernels.vllm as plugin

    assert "TokenPruneQwen2VLForConditionalGeneration" in plugin.ARCHITECTURES
    if importlib.util.find_spec("vllm.entrypoints") is None:  # tests/vllm may pose as "vllm"
        with pytest.raises(ImportError):
            plugin.register()
