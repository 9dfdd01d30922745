"""tokenprune_kernels.transformers.core: prune_inputs against a naive computation, the default
instruction rule, the generation bookkeeping, the public API's errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tokenprune_kernels.mapper import TokenMapper
from tokenprune_kernels.reference import keep_counts_ref, select_topk_ref
from tokenprune_kernels.transformers import (
    SUPPORTED_TRANSFORMERS,
    Layer0,
    TokenPruneConfig,
    apply_tokenprune,
    default_instruction_mask,
    prune_inputs,
    revert_tokenprune,
)
from tokenprune_kernels.transformers.core import (
    GenerationState,
    TokenPrunePatch,
    attach_patch,
    check_transformers_version,
    detach_patch,
    get_patch,
)

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
        ({}, "exactly one of keep_ratio and keep_count"),
        ({"keep_ratio": 0.5, "keep_count": 2}, "exactly one of keep_ratio and keep_count"),
        ({"keep_count": 0}, "keep_count must be an int >= 1"),
        ({"keep_count": True}, "keep_count must be an int >= 1"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenPruneConfig(**kwargs)


def test_config_mapper_type():
    with pytest.raises(TypeError, match="mapper must be None, a TokenMapper"):
        TokenPruneConfig(keep_ratio=0.5, mapper=object())


def test_layer0_errors():
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        Layer0(nn.Identity(), nn.Identity(), nn.Identity(), 3, 2, 4, _Rotary(), _apply_rotary)
    with pytest.raises(ValueError, match="head_dim must be an int >= 1"):
        Layer0(nn.Identity(), nn.Identity(), nn.Identity(), 2, 2, 0, _Rotary(), _apply_rotary)


def test_generation_state_translates_masks():
    pruned_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    st = GenerationState(full_length=7, pruned_length=4, attention_mask=pruned_mask,
                         removed=torch.tensor([2, 3]), pruned=None)  # fmt: skip

    class Cache:
        n = 4

        def get_seq_length(self):
            return self.n

    cache = Cache()
    st.bind_cache(cache)
    assert st.continues(cache) and not st.continues(Cache()) and not st.continues(None)
    cache.n = 6  # two tokens decoded; this call brings one more
    full = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    got = st.translate_attention_mask(full, past_length=6, query_length=1)
    assert got.tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]
    assert st.translate_attention_mask(got, 6, 1) is got  # already pruned
    assert st.translate_attention_mask(None, 6, 1).tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]
    with pytest.raises(ValueError, match="expects 10 \\(unpruned\\) or 7 \\(pruned\\)"):
        st.translate_attention_mask(full[:, :-1], 6, 1)
    with pytest.raises(NotImplementedError, match="2-D attention_mask"):
        st.translate_attention_mask(torch.ones(2, 1, 1, 7), 6, 1)
    st2 = GenerationState(7, 4, torch.ones(2, 4, dtype=torch.long), torch.tensor([3, 3]), None)
    assert st2.translate_attention_mask(None, 4, 1) is None


def test_patch_restores_instance_attributes():
    m = nn.Linear(2, 2)
    orig_forward = m.forward
    patch = TokenPrunePatch("qwen", TokenPruneConfig(keep_ratio=0.5), None)
    patch.set_attr(m, "forward", lambda x: x)
    patch.set_attr(m, "extra", 3)
    attach_patch(m, patch)
    assert get_patch(m) is patch and "forward" in vars(m)
    assert detach_patch(m) is patch
    assert get_patch(m) is None and "forward" not in vars(m) and not hasattr(m, "extra")
    assert m.forward == orig_forward
    assert detach_patch(m) is None


def test_version_check(monkeypatch):
    import transformers

    assert check_transformers_version() == transformers.__version__
    for bad in ("4.57.1", "5.16.2", "5.24.0", "not-a-version"):
        with pytest.raises(
            RuntimeError,
            match=rf"supports transformers {SUPPORTED_TRANSFORMERS}, but transformers {bad} is installed",
        ):
            check_transformers_version(bad)
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    with pytest.raises(RuntimeError, match=r"but transformers 6\.0\.0 is installed"):
        apply_tokenprune(nn.Linear(2, 2), keep_ratio=0.5)


def test_apply_unsupported_model_type():
    class Cfg:
        model_type = "gpt2"

    m = nn.Linear(2, 2)
    m.config = Cfg()
    with pytest.raises(
        ValueError,
        match=r"model_type 'gpt2' is not supported .*'llava', 'llava_onevision', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl'",
    ):
        apply_tokenprune(m, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"config\.model_type"):
        apply_tokenprune(nn.Linear(2, 2), keep_ratio=0.5)
    assert revert_tokenprune(m) is m  # harmless when not applied
