"""tokenprune_kernels.transformers.patch: the generation bookkeeping, the patch record, the
version check, the public API's errors; the old ``core`` names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenprune_kernels.transformers import (
    SUPPORTED_TRANSFORMERS,
    TokenPruneConfig,
    apply_tokenprune,
    revert_tokenprune,
)
from tokenprune_kernels.transformers.patch import (
    GenerationState,
    TokenPrunePatch,
    attach_patch,
    check_transformers_version,
    detach_patch,
    get_patch,
)


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


def test_core_keeps_its_names():
    """``tokenprune_kernels.transformers.core`` re-exports what moved to prune.py / patch.py."""
    from tokenprune_kernels.transformers import core, patch, prune

    for name in core.__all__:
        moved = getattr(prune, name) if hasattr(prune, name) else getattr(patch, name)
        assert getattr(core, name) is moved, name


def test_family_install_refuses_other_models():
    from tokenprune_kernels.transformers import llava, qwen

    with pytest.raises(
        ValueError,
        match=r"Linear is not a Qwen VL model this version supports: expected a module with language_model, get_placeholder_mask, rope_deltas",
    ):
        qwen.install(nn.Linear(2, 2), TokenPruneConfig(keep_ratio=0.5))
    with pytest.raises(TypeError, match="config must be a TokenPruneConfig"):
        llava.install(nn.Linear(2, 2), 0.5, None)
