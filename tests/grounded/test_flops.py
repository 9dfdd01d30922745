"""The analytic FLOPs of the grounded eval against torch's FLOP counter and by hand."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenprune_kernels.grounded import flops as F
from tokenprune_kernels.grounded.model import build_config, build_model
from tokenprune_kernels.mapper import MapperConfig, TokenMapper

SHAPE = F.LMShape(hidden=128, intermediate=384, heads=4, kv_heads=2, head_dim=32, layers=4)


@pytest.mark.parametrize("n", [1, 13])
def test_layer_flops_match_the_flop_counter(n):
    """torch counts every matmul of a real decoder layer; it counts the full n x n attention
    (masked, not skipped), ours the causal pairs: the rest must agree exactly."""
    model = build_model(build_config(attn_implementation="eager"), seed=1)
    shape = F.LMShape.from_config(model.config)
    assert shape == SHAPE
    lm = model.model.language_model
    h = torch.randn(1, n, shape.hidden)
    rope = lm.rotary_emb(h, torch.arange(n)[None].expand(3, 1, n))
    mask = torch.full((n, n), -1e9).triu(1)[None, None]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        lm.layers[0](h, attention_mask=mask, position_embeddings=rope, use_cache=False)
    causal = 2 * shape.heads * shape.head_dim * n * (n + 1)
    full = 4 * shape.heads * shape.head_dim * n * n
    assert fc.get_total_flops() == F.layer_flops(shape, n) - causal + full


def test_mapper_flops_match_the_flop_counter():
    mapper = TokenMapper(MapperConfig(channels=(8, 16, 5), kernel_size=3))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        mapper(torch.rand(1, 17), torch.tensor([17]))
    assert fc.get_total_flops() == F.mapper_flops((8, 16, 5), 3, 17)


def test_multi_channel_mapper_flops_match_the_flop_counter():
    """A mapper on per-group attention and the grid: its first block takes ``G + 2`` inputs, and
    the evaluation's selection overhead counts them."""
    from tokenprune_kernels.grounded.evaluate import layer0_rows_flops, selection_flops

    cfg = MapperConfig(channels=(8, 16, 5), kernel_size=3, attention_channels=2, grid=True)
    mapper = TokenMapper(cfg)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        mapper(torch.rand(1, 17, 2), torch.tensor([17]), grid=torch.rand(1, 17, 2))
    want = F.mapper_flops((8, 16, 5), 3, 17, in_channels=4)
    assert fc.get_total_flops() == want > F.mapper_flops((8, 16, 5), 3, 17)
    rows = [3, 30, 31]
    got = selection_flops("mapper", SHAPE, 40, 17, rows, mapper)
    assert got == layer0_rows_flops(SHAPE, rows) + want


def test_prefill_and_fastv_flops():
    n, nv = 300, 256
    full = F.prefill_flops(SHAPE, n)
    assert F.prefill_flops(SHAPE, n, nv, nv) == full == 4 * F.layer_flops(SHAPE, n)
    assert F.prefill_flops(SHAPE, n, nv, 8) == 4 * F.layer_flops(SHAPE, n - nv + 8)
    for layer in (1, 2):
        for k in (1, 64, nv):
            rel = F.fastv_flops(SHAPE, n, nv, k, layer) / full
            assert rel >= layer / SHAPE.layers
        assert F.fastv_flops(SHAPE, n, nv, nv, layer) > full  # its scoring costs extra
    with pytest.raises(ValueError, match="keep"):
        F.prefill_flops(SHAPE, n, nv, nv + 1)
    with pytest.raises(ValueError, match="layer"):
        F.prefill_flops(SHAPE, n, nv, 4, layer=5)


@pytest.mark.parametrize("layer", [1, 2])
def test_equal_compute_solver_inverts_the_flops(layer):
    n, nv = 211, 196
    for k in range(1, nv + 1):
        cost = F.fastv_flops(SHAPE, n, nv, k, layer)
        assert F.fastv_keep_for_budget(SHAPE, n, nv, cost, layer) == k
        assert F.fastv_keep_for_budget(SHAPE, n, nv, cost + 0.5, layer) == k
    lowest = F.fastv_flops(SHAPE, n, nv, 1, layer)
    assert F.fastv_keep_for_budget(SHAPE, n, nv, lowest - 1, layer) is None
    # half of the unpruned prefill is out of reach once half the layers run on every token
    assert F.fastv_keep_for_budget(SHAPE, n, nv, 0.5 * F.prefill_flops(SHAPE, n), 2) is None


def test_layer0_rows_by_hand():
    shape = F.LMShape(hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=3, layers=1)
    # queries at positions 5 and 7: Q 2*2*4*6, K of 8 keys 2*8*4*3, scores 2*2*3*(6+8)
    assert F.layer0_rows_flops(shape, [5, 7]) == 96 + 192 + 168
    assert F.layer0_rows_flops(shape, []) == 0
    assert F.fastv_scoring_flops(shape, 8) == 2 * 8 * 4 * 3 + 2 * 4 * 6 + 2 * 6 * 8


def test_lm_shape_from_config_reads_head_dim_and_text_config():
    text = types.SimpleNamespace(hidden_size=64, intermediate_size=100, num_attention_heads=4,
                                 num_key_value_heads=None, num_hidden_layers=3, head_dim=32)  # fmt: skip
    shape = F.LMShape.from_config(types.SimpleNamespace(text_config=text))
    assert shape == F.LMShape(64, 100, 4, 4, 32, 3)
