"""tokenprune_kernels.transformers.prune: prune_packed and prune_inputs against a naive
computation, the default instruction rule, the config and Layer0 checks."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from tokenprune_kernels.mapper import TokenMapper
from tokenprune_kernels.reference import keep_counts_ref, select_topk_ref
from tokenprune_kernels.transformers import (
    Layer0,
    TokenPruneConfig,
    default_instruction_mask,
    packed_instruction_mask,
    prune_inputs,
    prune_packed,
)
from tokenprune_kernels.transformers.prune import spread_coords

H, HQ, HK, D = 24, 4, 2, 6


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class _Rotary(nn.Module):
    """1-D RoPE, or M-RoPE-like for [R, B, T] ids: each row rotates its own slice of D/2."""

    def forward(self, x, position_ids):
        inv = 1.0 / (10.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # [D/2]
        if position_ids.dim() == 2:
            freqs = position_ids[..., None].float() * inv
        else:
            r = position_ids.shape[0]
            parts = torch.arange(D // 2) % r  # which row drives each frequency
            pos = position_ids.float().permute(1, 2, 0)[..., parts]  # [B, T, D/2]
            freqs = pos * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class _Layer(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.q = nn.Linear(H, HQ * D)
        self.k = nn.Linear(H, HK * D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.rot = _Rotary()

    def layer0(self, text_row: bool = False) -> Layer0:
        """``text_row``: the ids carry a leading text row the rotary skips (Qwen's 4-row ids)."""
        rot = (lambda x, p: self.rot(x, p[1:])) if text_row else self.rot
        return Layer0(self.norm, self.q, self.k, HQ, HK, D, rot, _apply_rotary)

    def naive_scores(self, x, pos, vis, instr):
        """One sample, unpadded: x [T, H], pos [T] or [R, T]; full softmax, eager style."""
        t = x.shape[0]
        h = self.norm(x)[None]
        q = self.q(h).view(1, t, HQ, D).transpose(1, 2)
        k = self.k(h).view(1, t, HK, D).transpose(1, 2)
        cos, sin = self.rot(h, pos[None] if pos.dim() == 1 else pos[:, None])
        q, k = _apply_rotary(q, k, cos, sin)
        k = k.repeat_interleave(HQ // HK, dim=1)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[0]  # [HQ, T, T]
        return probs[:, instr][:, :, vis].mean(dim=(0, 1))


def _batch(gen, layouts, side, rows):
    """layouts: per sample (n_sys, n_vis, n_txt); visual tokens are one block after n_sys."""
    lens = [sum(x) for x in layouts]
    length = max(lens) + 1  # at least one pad somewhere
    b = len(layouts)
    x = torch.randn(b, length, H, generator=gen)
    vis = torch.zeros(b, length, dtype=torch.bool)
    mask = torch.zeros(b, length, dtype=torch.long)
    pos = torch.zeros((rows, b, length) if rows else (b, length), dtype=torch.long)
    for i, (ns, nv, nt) in enumerate(layouts):
        n = ns + nv + nt
        off = length - n if side == "left" else 0
        mask[i, off : off + n] = 1
        vis[i, off + ns : off + ns + nv] = True
        p = torch.arange(n) * 3 + 7  # not contiguous on purpose: ids are carried, not recomputed
        if rows:
            pr = torch.stack([p + r for r in range(rows)])
            pr[1:, ns : ns + nv] = torch.randint(0, 50, (rows - 1, nv), generator=gen)
            pos[:, i, off : off + n] = pr
        else:
            pos[i, off : off + n] = p
    return x, vis, mask, pos


@pytest.mark.parametrize(
    ("side", "rows", "keep"),
    [("left", 0, 0.5), ("right", 3, 0.25), ("left", 4, 0.3), ("right", 0, 1.0)],
)
def test_prune_inputs_matches_naive(gen, side, rows, keep):
    layer = _Layer(gen)
    layouts = [(3, 17, 5), (2, 11, 2), (4, 0, 6), (1, 23, 3)]
    x, vis, mask, pos = _batch(gen, layouts, side, rows)
    l0 = layer.layer0(text_row=rows == 4)
    out = prune_inputs(x, vis, pos, l0, TokenPruneConfig(keep_ratio=keep), attention_mask=mask)
    instr = default_instruction_mask(vis, mask)
    new_len = 0
    for i in range(len(layouts)):
        real = mask[i].bool()
        idx = real.nonzero().flatten()
        xs, vs, ins = x[i, real], vis[i, real], instr[i, real]
        ps = pos[i, real] if rows == 0 else pos[:, i, real]
        nv = int(vs.sum())
        if nv:
            with torch.no_grad():
                s = layer.naive_scores(xs, ps[1:] if rows == 4 else ps, vs, ins)
            torch.testing.assert_close(out.scores[i], s, rtol=1e-4, atol=1e-6)
            k = keep_counts_ref(torch.tensor([0, nv]), keep_ratio=keep)
            kept, _ = select_topk_ref(s, torch.tensor([0, nv]), k)
            srt = s.sort(descending=True).values
            if int(k) < nv:  # no near-tie at the threshold
                assert float(srt[int(k) - 1] - srt[int(k)]) > 1e-5
        else:
            kept = torch.zeros(0, dtype=torch.long)
        keep_local = ~vs
        keep_local[vs.nonzero().flatten()[kept]] = True
        kept_pos = idx[keep_local]
        assert torch.equal(out.kept_visual[i], idx[vs.nonzero().flatten()[kept]])
        assert torch.equal(out.keep_mask[i].nonzero().flatten(), kept_pos)
        assert int(out.removed[i]) == nv - kept.numel()
        n_out = kept_pos.numel()
        new_len = max(new_len, n_out)
        row = out.attention_mask[i].bool()
        assert int(row.sum()) == n_out
        cols = row.nonzero().flatten()
        # Padding side kept and contiguous.
        if side == "left":
            assert torch.equal(
                cols, torch.arange(out.attention_mask.shape[1] - n_out, out.attention_mask.shape[1])
            )
        else:
            assert torch.equal(cols, torch.arange(n_out))
        assert torch.equal(out.index[i, cols], kept_pos)
        torch.testing.assert_close(out.inputs_embeds[i, cols], x[i, kept_pos], rtol=0, atol=0)
        if rows == 0:
            assert torch.equal(out.position_ids[i, cols], pos[i, kept_pos])
        else:
            assert torch.equal(out.position_ids[:, i, cols], pos[:, i, kept_pos])
    assert out.attention_mask.shape == (len(layouts), new_len)
    assert out.attention_mask.dtype == mask.dtype
    assert out.padding_side == side
    # prune_like follows the same index; pads get the pad value.
    labels = torch.arange(x.shape[0] * x.shape[1]).view(x.shape[0], -1)
    pl = out.prune_like(labels, -100)
    assert torch.equal(
        pl[out.attention_mask.bool()], labels.gather(1, out.index)[out.attention_mask.bool()]
    )
    assert bool((pl[~out.attention_mask.bool()] == -100).all())


def test_prune_inputs_keep_count_mapper_and_custom_instruction(gen):
    layer = _Layer(gen)
    x, vis, _, pos = _batch(gen, [(2, 13, 4), (2, 13, 4)], "left", 0)
    x, vis, pos = x[:, 1:], vis[:, 1:], pos[:, 1:]  # no pads at all
    instr = torch.zeros_like(vis)
    instr[:, :2] = True  # the system tokens ask: visual keys after the queries still count
    mapper = TokenMapper()
    out = prune_inputs(
        x, vis, pos, layer.layer0(), TokenPruneConfig(keep_count=5, mapper=mapper),
        instruction_mask=instr,
    )  # fmt: skip
    assert out.removed.tolist() == [8, 8]
    assert not out.has_padding and out.attention_mask.shape == (2, 2 + 5 + 4)
    for i in range(2):
        xs = x[i]
        with torch.no_grad():
            attn = layer.naive_scores(xs, pos[i], vis[i], instr[i])
            logits = mapper.forward_packed(attn, torch.tensor([0, 13]))
        torch.testing.assert_close(out.scores[i], logits, rtol=1e-4, atol=1e-5)
    assert out.flash_kwargs() == {}  # batch of 2
    one = prune_inputs(x[:1], vis[:1], pos[:1], layer.layer0(), TokenPruneConfig(keep_count=3))
    fk = one.flash_kwargs()
    assert fk["cu_seq_lens_q"].tolist() == [0, 2 + 3 + 4] and fk["max_length_k"] == 9
    assert torch.equal(one.text_positions(), torch.arange(9)[None])


def test_prune_inputs_grad_flows_to_embeddings(gen):
    layer = _Layer(gen)
    x, vis, mask, pos = _batch(gen, [(2, 9, 3)], "left", 0)
    x.requires_grad_(True)
    out = prune_inputs(
        x, vis, pos, layer.layer0(), TokenPruneConfig(keep_ratio=0.5), attention_mask=mask
    )
    out.inputs_embeds.sum().backward()
    assert torch.equal(x.grad[0].abs().sum(-1) > 0, out.keep_mask[0])


def _packed(gen, layouts, rows):
    """Packed samples (no pads), every tensor a NON-contiguous view. layouts: per sample
    (n_sys, n_vis, n_txt); visual tokens are one block after n_sys. Returns x [T, H], cu [B+1],
    vis [T], pos [T] or [R, T]."""
    lens = [sum(x) for x in layouts]
    t = sum(lens)
    x = torch.randn(t, 2 * H, generator=gen)[:, ::2]
    vis = torch.zeros(t, 2, dtype=torch.bool)[:, 0]
    pos = torch.zeros((rows, 2 * t) if rows else (2 * t,), dtype=torch.long)[..., ::2]
    off = 0
    for ns, nv, nt in layouts:
        n = ns + nv + nt
        vis[off + ns : off + ns + nv] = True
        p = torch.arange(n) * 3 + 7  # not contiguous on purpose: ids are carried, not recomputed
        if rows:
            pr = torch.stack([p + r for r in range(rows)])
            pr[1:, ns : ns + nv] = torch.randint(0, 50, (rows - 1, nv), generator=gen)
            pos[:, off : off + n] = pr
        else:
            pos[off : off + n] = p
        off += n
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    assert not x.is_contiguous() and not vis.is_contiguous() and not pos.is_contiguous()
    return x, cu, vis, pos


@pytest.mark.parametrize(
    ("rows", "keep", "instruction"),
    [(0, 0.5, "default"), (3, 0.25, "default"), (2, 1.0, "system"), (0, 3, "default")],
)
def test_prune_packed_matches_naive(gen, rows, keep, instruction):
    """Samples of awkward sizes (one token, none, visual first, primes), strided inputs."""
    layer = _Layer(gen)
    layouts = [(3, 17, 5), (1, 0, 0), (0, 0, 0), (2, 11, 2), (0, 7, 1), (1, 23, 3)]
    x, cu, vis, pos = _packed(gen, layouts, rows)
    if instruction == "default":
        instr = packed_instruction_mask(vis, cu)
    else:  # the system tokens ask; the visual tokens after a query still count as keys
        instr = torch.zeros_like(vis)
        for (ns, nv, _), start in zip(layouts, cu[:-1].tolist(), strict=True):
            instr[start : start + (ns if nv else 0)] = True
        layouts[4] = (0, 0, 8)  # no instruction before its image: now a text-only sample
        vis[int(cu[4]) : int(cu[5])] = False
    config = TokenPruneConfig(keep_count=keep) if isinstance(keep, int) else None
    config = config or TokenPruneConfig(keep_ratio=keep)
    out = prune_packed(x, cu, vis, instr, pos, layer.layer0(), config)

    want_src, want_vis, want_kept, want_scores, kept_counts = [], [], [], [], []
    n_seen = 0
    for i in range(len(layouts)):
        a, b = int(cu[i]), int(cu[i + 1])
        vs, ins = vis[a:b], instr[a:b]
        nv = int(vs.sum())
        rows_v = torch.arange(a, b)[vs]
        keep_local = ~vs
        if nv:
            with torch.no_grad():
                s = layer.naive_scores(x[a:b], pos[..., a:b], vs, ins)
            k = keep_counts_ref(torch.tensor([0, nv]), keep_ratio=config.keep_ratio,
                                keep_count=config.keep_count)  # fmt: skip
            kept, _ = select_topk_ref(s, torch.tensor([0, nv]), k)
            srt = s.sort(descending=True).values
            if int(k) < nv:  # no near-tie at the threshold
                assert float(srt[int(k) - 1] - srt[int(k)]) > 1e-5
            keep_local[vs.nonzero().flatten()[kept]] = True
            want_scores.append(s)
            want_kept.append(kept + n_seen)
        kept_counts.append(int(keep_local.sum()) - int((~vs).sum()))
        want_src.append(torch.arange(a, b)[keep_local])
        want_vis.append(rows_v)
        n_seen += nv
    src = torch.cat(want_src)
    assert torch.equal(out.src_index, src)
    assert torch.equal(out.visual_index, torch.cat(want_vis))
    assert torch.equal(out.kept_index, torch.cat(want_kept))
    assert torch.equal(out.kept_rows, out.visual_index[out.kept_index])
    torch.testing.assert_close(out.scores, torch.cat(want_scores), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.inputs_embeds, x[src], rtol=0, atol=0)
    assert torch.equal(out.position_ids, pos[..., src])
    lens = [w.numel() for w in want_src]
    assert out.cu_seqlens.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert out.cu_seqlens_kept.tolist() == [0, *torch.tensor(kept_counts).cumsum(0).tolist()]
    n_vis = [w.numel() for w in want_vis]
    assert out.cu_seqlens_visual.tolist() == [0, *torch.tensor(n_vis).cumsum(0).tolist()]
    assert out.cu_seqlens.dtype == out.cu_seqlens_kept.dtype == torch.int64


def test_prune_packed_grad_flows_to_the_kept_rows(gen):
    layer = _Layer(gen)
    x, cu, vis, pos = _packed(gen, [(2, 9, 3), (1, 5, 2)], 0)
    x = x.clone().requires_grad_(True)
    out = prune_packed(x, cu, vis, packed_instruction_mask(vis, cu), pos, layer.layer0(),
                       TokenPruneConfig(keep_ratio=0.5))  # fmt: skip
    out.inputs_embeds.sum().backward()
    survived = torch.zeros(x.shape[0], dtype=torch.bool)
    survived[out.src_index] = True
    assert torch.equal(x.grad.abs().sum(-1) > 0, survived)
    assert not out.scores.requires_grad


def test_packed_instruction_mask_is_the_padded_rule_packed(gen):
    _, vis, mask, _ = _batch(gen, [(3, 4, 2), (2, 0, 3), (1, 5, 0), (0, 2, 4)], "left", 0)
    real = mask.bool()
    cu = torch.tensor([0, *real.sum(1).cumsum(0).tolist()])
    got = packed_instruction_mask(vis[real], cu)
    assert torch.equal(got, default_instruction_mask(vis, mask)[real])
    assert got.tolist() == [0] * 7 + [1, 1] + [0] * 5 + [0] * 6 + [0, 0, 1, 1, 1, 1]


def test_prune_packed_errors(gen):
    layer = _Layer(gen)
    x, cu, vis, pos = _packed(gen, [(2, 5, 3), (1, 4, 2)], 0)
    instr = packed_instruction_mask(vis, cu)
    cfg = TokenPruneConfig(keep_ratio=0.5)
    l0 = layer.layer0()
    with pytest.raises(
        ValueError, match=r"cu_seqlens must start at 0, never decrease and end at T = 17"
    ):
        prune_packed(x, cu + 1, vis, instr, pos, l0, cfg)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        prune_packed(x, torch.tensor([0, 12, 10, 17]), vis, instr, pos, l0, cfg)
    with pytest.raises(TypeError, match=r"cu_seqlens must be int32 or int64, got torch\.float32"):
        prune_packed(x, cu.float(), vis, instr, pos, l0, cfg)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D \[B\+1\] tensor"):
        prune_packed(x, cu[None], vis, instr, pos, l0, cfg)
    with pytest.raises(ValueError, match=r"inputs_embeds must be a \[T, H\] tensor"):
        prune_packed(x[None], cu, vis, instr, pos, l0, cfg)
    with pytest.raises(TypeError, match="inputs_embeds must be float32/float16/bfloat16"):
        prune_packed(x.double(), cu, vis, instr, pos, l0, cfg)
    with pytest.raises(ValueError, match=r"visual_mask must have shape \[T\] = \[17\], got \[16\]"):
        prune_packed(x, cu, vis[1:], instr, pos, l0, cfg)
    with pytest.raises(TypeError, match="instruction_mask must be a bool or integer tensor"):
        prune_packed(x, cu, vis, instr.float(), pos, l0, cfg)
    with pytest.raises(ValueError, match="instruction_mask must not select visual tokens"):
        prune_packed(x, cu, vis, instr | vis, pos, l0, cfg)
    with pytest.raises(
        ValueError, match=r"sample\(s\) \[1\] have visual tokens but no instruction"
    ):
        prune_packed(x, cu, vis, instr & (torch.arange(17) < 10), pos, l0, cfg)
    with pytest.raises(ValueError, match=r"position_ids must end in T = 17"):
        prune_packed(x, cu, vis, instr, pos[1:], l0, cfg)
    with pytest.raises(ValueError, match=r"position_ids must be \[T\] or \[R, T\]"):
        prune_packed(x, cu, vis, instr, pos[None, None], l0, cfg)
    with pytest.raises(TypeError, match="layer0 must be a Layer0"):
        prune_packed(x, cu, vis, instr, pos, layer, cfg)
    # integer masks are nonzero-true
    got = prune_packed(x, cu, vis.int(), instr.to(torch.uint8), pos, l0, cfg)
    assert torch.equal(got.src_index, prune_packed(x, cu, vis, instr, pos, l0, cfg).src_index)


def test_default_instruction_mask():
    vis = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]).bool()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7, [0, 1, 1, 1, 1, 1, 1]])
    got = default_instruction_mask(vis, mask)
    want = torch.tensor([[0, 0, 0, 0, 0, 1, 0], [0] * 7, [0, 0, 1, 1, 1, 1, 1]]).bool()
    assert torch.equal(got, want)


def test_prune_inputs_errors(gen):
    layer = _Layer(gen)
    x, vis, mask, pos = _batch(gen, [(2, 5, 0)], "right", 0)  # ends with a visual token
    cfg = TokenPruneConfig(keep_ratio=0.5)
    with pytest.raises(ValueError, match="no instruction tokens"):
        prune_inputs(x, vis, pos, layer.layer0(), cfg, attention_mask=mask)
    with pytest.raises(ValueError, match="instruction_mask must not select visual"):
        prune_inputs(x, vis, pos, layer.layer0(), cfg, attention_mask=mask, instruction_mask=vis)
    with pytest.raises(ValueError, match=r"visual_mask must have shape \[B, L\]"):
        prune_inputs(x, vis[:, 1:], pos, layer.layer0(), cfg)
    with pytest.raises(ValueError, match="inputs_embeds must be a"):
        prune_inputs(x[0], vis, pos, layer.layer0(), cfg)
    with pytest.raises(ValueError, match="position_ids must end in"):
        prune_inputs(x, vis, pos[:, 1:], layer.layer0(), cfg)
    with pytest.raises(ValueError, match="padding_side"):
        prune_inputs(x, vis, pos, layer.layer0(), cfg, padding_side="middle")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\], got 0.0"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"),
        ({}, "exactly one of keep_ratio, keep_count and keep_mass"),
        (
            {"keep_ratio": 0.5, "keep_count": 2},
            "exactly one of keep_ratio, keep_count and keep_mass",
        ),
        (
            {"keep_mass": 0.5, "keep_count": 2},
            "exactly one of keep_ratio, keep_count and keep_mass",
        ),
        ({"keep_mass": 0.0}, r"keep_mass must be in \(0, 1\], got 0.0"),
        ({"keep_mass": np.float64(1.5)}, r"keep_mass must be in \(0, 1\], got np.float64\(1.5\)"),
        ({"keep_mass": True}, r"keep_mass must be a real number in \(0, 1\]"),
        (
            {"keep_mass": 0.9, "min_keep_ratio": -0.5},
            r"min_keep_ratio must be in \[0, 1\], got -0.5",
        ),
        ({"keep_mass": 0.9, "max_keep_ratio": 0}, r"max_keep_ratio must be in \(0, 1\], got 0"),
        (
            {"keep_mass": 0.9, "min_keep_ratio": 0.5, "max_keep_ratio": 0.25},
            "min_keep_ratio must be <= max_keep_ratio",
        ),
        (
            {"keep_ratio": 0.5, "min_keep_ratio": 0.1},
            "min_keep_ratio and max_keep_ratio bound keep_mass only",
        ),
        ({"keep_count": 0}, "keep_count must be an int >= 1"),
        ({"keep_count": True}, "keep_count must be an int >= 1"),
        ({"keep_ratio": np.float32(1.5)}, r"keep_ratio must be in \(0, 1\], got np.float32\(1.5\)"),
        ({"keep_ratio": float("nan")}, r"keep_ratio must be in \(0, 1\], got nan"),
        ({"keep_ratio": torch.tensor(0.0)}, r"keep_ratio must be in \(0, 1\], got tensor\(0.\)"),
        ({"keep_count": np.int64(0)}, "keep_count must be an int >= 1"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenPruneConfig(**kwargs)


@pytest.mark.parametrize(
    "value",
    [
        np.float32(0.5),
        np.float64(0.25),
        np.float16(1.0),
        Fraction(1, 3),
        1,
        np.int64(1),
        torch.tensor(0.5),
        torch.tensor(0.75, dtype=torch.float64),
        torch.tensor(1),
    ],
)
def test_keep_ratio_takes_any_real_number(value):
    """numbers.Real (Python, numpy scalars, Fraction) and 0-d real tensors, stored as float."""
    config = TokenPruneConfig(keep_ratio=value)
    assert type(config.keep_ratio) is float and config.keep_ratio == float(value)
    assert config.op_kwargs(torch.device("cpu"))["keep_ratio"] == float(value)


@pytest.mark.parametrize(
    "value",
    [True, np.bool_(True), torch.tensor(True), torch.tensor([0.5]), "0.5", Decimal("0.5"), 0.5j],
)
def test_keep_ratio_rejects_what_is_not_a_real_number(value):
    with pytest.raises(ValueError, match=r"keep_ratio must be a real number in \(0, 1\]"):
        TokenPruneConfig(keep_ratio=value)


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), torch.tensor(3), 3])
def test_keep_count_takes_any_integer(value):
    config = TokenPruneConfig(keep_count=value)
    assert type(config.keep_count) is int and config.keep_count == 3


@pytest.mark.parametrize(
    "value", [3.0, np.float64(3.0), np.bool_(True), torch.tensor(3.0), torch.tensor([3])]
)
def test_keep_count_rejects_what_is_not_an_integer(value):
    with pytest.raises(ValueError, match="keep_count must be an int >= 1"):
        TokenPruneConfig(keep_count=value)


def test_config_mapper_type():
    with pytest.raises(TypeError, match="mapper must be None, a TokenMapper"):
        TokenPruneConfig(keep_ratio=0.5, mapper=object())


def test_layer0_errors():
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        Layer0(nn.Identity(), nn.Identity(), nn.Identity(), 3, 2, 4, _Rotary(), _apply_rotary)
    with pytest.raises(ValueError, match="head_dim must be an int >= 1"):
        Layer0(nn.Identity(), nn.Identity(), nn.Identity(), 2, 2, 0, _Rotary(), _apply_rotary)


def test_spread_coords_segments_frames_and_items():
    """(segment, row, col) from M-RoPE t/h/w ids: an image is one segment, every frame of a
    video one (also two frames that share t), every new run of visual tokens a new one even
    when its t lies below the previous item's (a long video before an image); rows and columns
    are the h and w ids; the text row of 4-row ids is not read."""
    # sample 0: text, a 2x2 image (t 5), text, a video of 3 frames 1x2 with t 8, 8, 9 (shared t),
    # then an image (t 7: below the video's last t); sample 1: a 2x1 image.
    t = [0, 5, 5, 5, 5, 6, 8, 8, 8, 8, 9, 9, 20, 7, 7, 0, 3, 3]
    h = [0, 5, 5, 6, 6, 6, 8, 8, 8, 8, 8, 8, 20, 7, 7, 0, 3, 4]
    w = [0, 5, 6, 5, 6, 6, 8, 9, 8, 9, 8, 9, 20, 7, 8, 0, 3, 3]
    vis = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    seg = torch.tensor([0] * 15 + [1] * 3)
    pos = torch.tensor([t, h, w])
    want = [[0, 5, 5], [0, 5, 6], [0, 6, 5], [0, 6, 6], [1, 8, 8], [1, 8, 9], [2, 8, 8],
            [2, 8, 9], [3, 8, 8], [3, 8, 9], [4, 7, 7], [4, 7, 8], [5, 3, 3], [5, 4, 3]]  # fmt: skip
    for ids in (pos, torch.cat([torch.arange(18)[None] * 100, pos])):
        got = spread_coords(ids, vis, seg)
        assert got.dtype == torch.int64 and got.tolist() == want
    for bad in (pos[0], pos[:2]):
        with pytest.raises(ValueError, match=r"spread_radius > 0 needs multi-axis rotary"):
            spread_coords(bad, vis, seg)


@pytest.mark.parametrize("radius", [1, 2])
def test_prune_packed_spread_matches_reference(gen, radius):
    """prune_packed with spread_radius: the kept tokens are spread_select_ref's on the op's own
    scores with the coordinates of :func:`spread_coords`; 1-D ids are refused."""
    from tokenprune_kernels.reference import keep_counts_ref, spread_select_ref

    layer = _Layer(gen)
    x, cu, vis, pos = _packed(gen, [(2, 24, 3), (1, 19, 2)], 3)
    n_vis = [int(vis[int(cu[b]) : int(cu[b + 1])].sum()) for b in range(2)]
    # The visual tokens of each sample: a grid 5 wide (t, h, w), raster order.
    for b in range(2):
        rows = vis.nonzero().flatten()[sum(n_vis[:b]) : sum(n_vis[: b + 1])]
        i = torch.arange(n_vis[b])
        pos[:, rows] = torch.stack([torch.full_like(i, 40), 40 + i // 5, 40 + i % 5])
    instr = packed_instruction_mask(vis, cu)
    cfg = TokenPruneConfig(keep_ratio=0.3, spread_radius=radius)
    out = prune_packed(x, cu, vis, instr, pos, layer.layer0(), cfg)
    cu_v = torch.tensor([0, n_vis[0], sum(n_vis)])
    seg = torch.repeat_interleave(torch.arange(2), cu[1:] - cu[:-1])
    counts = keep_counts_ref(cu_v, keep_ratio=0.3)
    want, _ = spread_select_ref(out.scores, cu_v, counts, spread_coords(pos, vis, seg), radius)
    assert torch.equal(out.kept_index, want)
    plain = prune_packed(x, cu, vis, instr, pos, layer.layer0(), TokenPruneConfig(keep_ratio=0.3))
    assert not torch.equal(plain.kept_index, want)
    with pytest.raises(ValueError, match=r"spread_radius > 0 needs multi-axis rotary"):
        prune_packed(x, cu, vis, instr, pos[0], layer.layer0(), cfg)


@pytest.mark.parametrize("value", [-1, 65, 1.0, True, "1", np.float32(1.0)])
def test_spread_radius_config_errors(value):
    with pytest.raises(ValueError, match=r"spread_radius must be an int in \[0, 64\]"):
        TokenPruneConfig(keep_ratio=0.5, spread_radius=value)


@pytest.mark.parametrize("value", [0, 3, 64, np.int64(2), torch.tensor(1)])
def test_spread_radius_takes_any_integer(value):
    assert TokenPruneConfig(keep_ratio=0.5, spread_radius=value).spread_radius == int(value)
