"""Model-agnostic core of the transformers integration: prune a padded batch at the LLM input.

What this module provides (the families in ``qwen.py`` / ``llava.py`` build on it):

- :class:`TokenPruneConfig`: keep ratio or keep count, and the mapper (``None``: training-free
  mode, the score is the raw layer-0 instruction-to-visual attention).
- :class:`Layer0`: what is needed to compute the FIRST decoder layer's queries and keys from the
  LLM input embeddings (the model's own input norm, q/k projections, optional q/k norms and
  rotary embedding). Nothing ever asks the model for ``output_attentions``.
- :func:`prune_inputs`: the generic function. Given ``inputs_embeds [B, L, H]`` with the visual
  features already in place, a visual mask, the full-sequence position ids and (optionally) the
  attention and instruction masks, it packs the batch (drops pads), computes layer-0 queries for the
  instruction tokens only and keys for the prefix they see, calls
  ``torch.ops.tokenprune.prune_and_merge`` and re-pads. Kept tokens keep their ORIGINAL position
  ids. Any model code (VILA1.5, or a LLaVA-style model without a transformers class) can call it
  in place of its ``masked_scatter`` + LLM call.
- :func:`default_instruction_mask`: the default instruction rule, the real (non-pad) tokens
  after the LAST visual token of each sample (for a chat prompt: the user's question plus the
  assistant header the processor appends).
- Patch bookkeeping (:class:`TokenPrunePatch`): instance attributes set by a family are recorded
  and restored exactly by ``revert_tokenprune``; classes are never touched, so other instances
  and other models are unaffected.
- Generation bookkeeping (:class:`GenerationState`), shared by the families.

Generation bookkeeping
----------------------
``generate()`` keeps the UNPRUNED view of the prompt: its 2-D ``attention_mask`` is
``[B, L + t]`` and its ``position_ids`` (transformers >= 5.17 prepares them itself for the models
whose ``forward`` takes ``position_ids``) continue from the unpruned positions. After a pruned
prefill the KV cache holds only ``L'`` prompt tokens. The rule we keep:

1. Positions are never renumbered. Kept tokens keep their original ids, and a decoded token gets
   exactly the id it would have had without pruning. ``generate()``'s own ``position_ids`` already
   do this (they are the unpruned ones). Families whose model derives positions from a stored
   offset (Qwen's ``rope_deltas``) keep that offset in the UNPRUNED frame (so ``generate()``'s
   own continuation logic stays right) and hand explicit unpruned-frame position ids to
   continuation calls that bring none (``GenerationState.removed`` converts a pruned cache length
   back to the unpruned one).
2. The attention mask is translated: at prefill the state stores the pruned prompt mask
   ``[B, L']`` and the unpruned width ``L``; a later call whose ``past_key_values`` is the SAME
   cache object (identity, held through a weak reference) is a continuation, and its mask
   ``[B, L + t]`` becomes ``cat(pruned_mask, mask[:, L:])`` = ``[B, L' + t]``, which matches the
   cache. A mask that is already in the pruned frame passes unchanged; any other width is an error.
   Without a mask, one is made (``cat(pruned_mask, ones)``) when the pruned prompt has pads.
3. A call with no cache or an empty one is a new prefill and starts a new state; a call with a
   different non-empty cache is not ours and passes through untouched.

``transformers`` 5.17 - 5.23 have no ``cache_position`` in these models or in ``generate()``, so
nothing else needs translating. Compileable (static) caches make ``generate()`` build 4-D masks
for the unpruned length before the model runs; those are refused with a clear error.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import tokenprune_kernels as tp
from tokenprune_kernels.mapper import TokenMapper

# Only what was verified: the tests of tests/transformers pass on 5.23.0 and 5.17.0.
SUPPORTED_TRANSFORMERS = ">=5.17,<5.24"

PATCH_ATTR = "_tokenprune_patch"

InstructionMaskSpec = (
    torch.Tensor
    | Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor | None], torch.Tensor]
    | None
)


def check_transformers_version(version: str | None = None) -> str:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed transformers) is in
    :data:`SUPPORTED_TRANSFORMERS`. Returns the version string."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import transformers

        version = transformers.__version__
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(
            f"tokenprune_kernels.transformers supports transformers {SUPPORTED_TRANSFORMERS}, "
            f"but transformers {version} is installed"
        )
    return version


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenPruneConfig:
    """How many visual tokens to keep and how to score them.

    Attributes:
        keep_ratio: fraction in ``(0, 1]``; per sample ``clamp(floor(r * n + 0.5), 1, n)``.
        keep_count: tokens kept per sample (``>= 1``, at most the sample's visual tokens).
        mapper: ``None`` for the training-free mode (raw layer-0 attention is the score), or a
            :class:`~tokenprune_kernels.mapper.TokenMapper` (the paper's method).

    Exactly one of ``keep_ratio`` / ``keep_count`` is set.
    """

    keep_ratio: float | None = None
    keep_count: int | None = None
    mapper: TokenMapper | None = None

    def __post_init__(self) -> None:
        if (self.keep_ratio is None) == (self.keep_count is None):
            raise ValueError(
                "exactly one of keep_ratio and keep_count must be given, got "
                f"keep_ratio={self.keep_ratio!r}, keep_count={self.keep_count!r}"
            )
        if self.keep_ratio is not None:
            r = self.keep_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0):
                raise ValueError(f"keep_ratio must be in (0, 1], got {r!r}")
        if self.keep_count is not None:
            c = self.keep_count
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"keep_count must be an int >= 1, got {c!r}")
        if self.mapper is not None and not isinstance(self.mapper, TokenMapper):
            raise TypeError(
                "mapper must be None, a TokenMapper or a path to a .safetensors mapper, got "
                f"{type(self.mapper).__name__}"
            )

    def op_kwargs(self, device: torch.device) -> dict[str, Any]:
        """Keyword arguments of ``tokenprune_kernels.prune_and_merge`` for this config (mapper
        parameters as float32 on ``device``)."""
        if self.mapper is None:
            params: list[torch.Tensor] = []
            ks, eps = 5, 1e-4
        else:
            params = [p.to(device=device, dtype=torch.float32) for p in self.mapper.op_params()]
            ks, eps = self.mapper.config.kernel_size, self.mapper.config.input_eps
        return {
            "mapper_params": params,
            "mapper_kernel_size": ks,
            "mapper_input_eps": eps,
            "keep_ratio": None if self.keep_ratio is None else float(self.keep_ratio),
            "keep_count": self.keep_count,
        }


# --------------------------------------------------------------------------------------------
# Layer 0
# --------------------------------------------------------------------------------------------


class Layer0:
    """The first decoder layer's query/key path, taken from the model's own modules.

    Args:
        input_layernorm: the layer's input norm (``x [..., H] -> [..., H]``).
        q_proj, k_proj: ``[..., H] -> [..., Hq * D]`` and ``[..., Hk * D]``.
        num_heads, num_kv_heads, head_dim: ``Hq``, ``Hk``, ``D``.
        rotary: ``rotary(x [1, T, H], position_ids) -> (cos, sin)`` where ``position_ids`` is
            ``[1, T]`` (1-D RoPE) or ``[R, 1, T]`` (one row per position axis, e.g. Qwen M-RoPE) -
            the layout the caller of :func:`prune_inputs` uses, restricted to the rows needed.
        apply_rotary: ``apply_rotary(q [1, Hq, T, D], k [1, Hk, T, D], cos, sin) -> (q, k)``
            (transformers' ``apply_rotary_pos_emb``).
        q_norm, k_norm: optional per-head norms applied to ``[..., D]`` before rotary (Qwen3).
        scaling: softmax scale; ``None`` means ``1 / sqrt(D)``.
    """

    def __init__(
        self,
        input_layernorm: Callable[[torch.Tensor], torch.Tensor],
        q_proj: Callable[[torch.Tensor], torch.Tensor],
        k_proj: Callable[[torch.Tensor], torch.Tensor],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        q_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
        k_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
        scaling: float | None = None,
    ) -> None:
        for name, value in (
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.input_layernorm = input_layernorm
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rotary = rotary
        self.apply_rotary = apply_rotary
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.scaling = None if scaling is None else float(scaling)

    @classmethod
    def from_decoder_layer(
        cls,
        layer: nn.Module,
        rotary_emb: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> Layer0:
        """Build from a Llama/Qwen2/Qwen3-style decoder layer: ``layer.input_layernorm``,
        ``layer.self_attn.{q_proj, k_proj, q_norm?, k_norm?, scaling?, head_dim?, config}``."""
        attn = layer.self_attn
        cfg = attn.config
        num_heads = int(cfg.num_attention_heads)
        num_kv = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // num_heads
        return cls(
            input_layernorm=layer.input_layernorm,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            rotary=rotary_emb,
            apply_rotary=apply_rotary,
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            scaling=getattr(attn, "scaling", None),
        )

    def _project(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        proj: Callable[[torch.Tensor], torch.Tensor],
        norm: Callable[[torch.Tensor], torch.Tensor] | None,
        heads: int,
        is_query: bool,
    ) -> torch.Tensor:
        t = x.shape[0]
        h = self.input_layernorm(x.unsqueeze(0))  # [1, T, H]
        y = proj(h).view(1, t, heads, self.head_dim)
        if norm is not None:
            y = norm(y)
        y = y.transpose(1, 2)  # [1, heads, T, D]
        cos, sin = self.rotary(h, position_ids)
        y = self.apply_rotary(y, y, cos, sin)[0 if is_query else 1]
        return y[0].transpose(0, 1).contiguous()  # [T, heads, D]

    def queries(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Layer-0 queries after rotary. ``x: [T, H]`` input embeddings of the rows,
        ``position_ids: [1, T]`` or ``[R, 1, T]``. Returns ``[T, Hq, D]`` in ``x``'s dtype."""
        return self._project(x, position_ids, self.q_proj, self.q_norm, self.num_heads, True)

    def keys(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Layer-0 keys after rotary, as :meth:`queries`. Returns ``[T, Hk, D]``."""
        return self._project(x, position_ids, self.k_proj, self.k_norm, self.num_kv_heads, False)


# --------------------------------------------------------------------------------------------
# Pruning a padded batch
# --------------------------------------------------------------------------------------------


@dataclass
class PrunedInputs:
    """The pruned batch (``L'`` = the longest pruned sample) and how it maps to the input.

    Attributes:
        inputs_embeds: ``[B, L', H]`` (input dtype).
        position_ids: same layout as given, ``[B, L']`` or ``[R, B, L']``; original ids.
        attention_mask: ``[B, L']`` (1 real / 0 pad; the input's dtype, int64 without one);
            padding sits on ``padding_side``.
        keep_mask: ``[B, L]`` bool, the original positions that survive (pads are False).
        index: ``[B, L']`` int64, the original position of each output position (pads point to a
            valid dummy position of the same sample).
        removed: ``[B]`` int64, visual tokens removed per sample.
        kept_visual: per sample, ``[k_b]`` int64 original positions of the kept visual tokens.
        scores: per sample, ``[n_v]`` float32 the ranked scores of its visual tokens.
        padding_side: ``"left"`` or ``"right"``.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep_mask: torch.Tensor
    index: torch.Tensor
    removed: torch.Tensor
    kept_visual: list[torch.Tensor]
    scores: list[torch.Tensor]
    padding_side: str = "left"

    @property
    def has_padding(self) -> bool:
        """Whether any output position is a pad."""
        return bool((self.attention_mask == 0).any())

    def prune_like(self, t: torch.Tensor, pad_value: float | int = 0) -> torch.Tensor:
        """Prune a per-token tensor ``t [B, L, ...]`` the same way: ``[B, L', ...]``, pads set
        to ``pad_value`` (e.g. ``-100`` for labels). Differentiable in ``t``."""
        b, length = self.keep_mask.shape
        if t.dim() < 2 or t.shape[0] != b or t.shape[1] != length:
            raise ValueError(f"t must be [B={b}, L={length}, ...], got {tuple(t.shape)}")
        idx = self.index.to(t.device)
        idx = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        out = torch.gather(t, 1, idx)
        pad = (self.attention_mask == 0).to(t.device)
        if bool(pad.any()):
            pad = pad.view(*pad.shape, *([1] * (t.dim() - 2)))
            out = out.masked_fill(pad, pad_value)
        return out

    def text_positions(self) -> torch.Tensor:
        """Contiguous 1-D positions of the pruned batch, ``[B, L']`` int64
        (``cumsum(attention_mask) - 1``, pads 0). Not for rotary (that uses the original ids):
        for the slots where transformers only reads positions to detect packed sequences."""
        m = self.attention_mask.to(torch.int64)
        return (m.cumsum(-1) - 1).masked_fill(m == 0, 0)

    def flash_kwargs(self) -> dict[str, Any]:
        """FlashAttention varlen kwargs for a batch of one without pads, else ``{}``.

        transformers' FlashAttention path treats 1-D ``position_ids`` that are not contiguous as
        several packed sequences when there is no attention mask and the batch is one sample.
        The original (gapped) ids of a pruned sequence would trigger that; passing explicit
        ``cu_seq_lens_q/k`` and ``max_length_q/k`` (ignored by sdpa/eager) keeps it one sequence.
        Use at prefill only.
        """
        b, length = self.attention_mask.shape
        if b != 1 or self.has_padding:
            return {}
        cu = torch.tensor([0, length], dtype=torch.int32, device=self.attention_mask.device)
        return {
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": length,
            "max_length_k": length,
        }


def _check_bool_mask(name: str, mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape [B, L] = {list(shape)}, got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must be a bool or integer tensor, got {mask.dtype}")
        mask = mask != 0
    return mask


def default_instruction_mask(
    visual_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The default instruction tokens: the real (non-pad) tokens after the LAST visual token.

    Args:
        visual_mask: ``[B, L]`` bool, True at visual tokens.
        attention_mask: ``[B, L]`` (1 real / 0 pad) or None (no pads).

    Returns:
        ``[B, L]`` bool. A sample without visual tokens gets no instruction tokens (it is not
        pruned). For a chat prompt this is the user's text after the image/video plus the
        assistant header the processor appends.
    """
    visual_mask = _check_bool_mask("visual_mask", visual_mask, tuple(visual_mask.shape[:2]))
    b, length = visual_mask.shape
    pos = torch.arange(length, device=visual_mask.device).expand(b, length)
    last = torch.where(visual_mask, pos, torch.full_like(pos, -1)).amax(dim=1, keepdim=True)
    after = (pos > last) & (last >= 0)
    if attention_mask is not None:
        after = after & _check_bool_mask("attention_mask", attention_mask, (b, length)).to(
            after.device
        )
    return after


def _infer_padding_side(real: torch.Tensor) -> str:
    """``left`` when every sample ends with a real token (or there are no pads), else ``right``."""
    if bool(real.all()) or bool(real[:, -1].all()):
        return "left"
    return "right"


def _cu(counts: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    cu[1:] = torch.cumsum(counts.to(torch.int64), 0)
    return cu


def _rows_of(position_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Position ids of the rows selected by a ``[B, L]`` bool mask, in the layout Layer0.rotary
    takes: ``[1, T]`` for ``[B, L]`` ids, ``[R, 1, T]`` for ``[R, B, L]`` ids."""
    if position_ids.dim() == 2:
        return position_ids[rows].unsqueeze(0)
    return position_ids[:, rows].unsqueeze(1)


def prune_inputs(
    inputs_embeds: torch.Tensor,
    visual_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    layer0: Layer0,
    config: TokenPruneConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    instruction_mask: torch.Tensor | None = None,
    padding_side: str | None = None,
) -> PrunedInputs:
    """Score the visual tokens from layer-0 attention, keep the top-k, return the pruned batch.

    The generic entry point: what model code calls instead of ``masked_scatter`` + LLM input
    (the visual features must already sit at the visual positions of ``inputs_embeds``).

    Args:
        inputs_embeds: ``[B, L, H]`` float32/float16/bfloat16 LLM input embeddings.
        visual_mask: ``[B, L]`` (or ``[B, L, 1]``) bool, True at visual tokens.
        position_ids: the model's full-sequence position ids, ``[B, L]`` (1-D RoPE) or
            ``[R, B, L]`` (e.g. Qwen M-RoPE, ``R`` = 3, or 4 with a leading text row; ``layer0``'s
            rotary picks the rows it needs). ``None``: ``cumsum(attention_mask) - 1``.
        layer0: the model's first layer (:class:`Layer0`).
        config: :class:`TokenPruneConfig`.
        attention_mask: ``[B, L]`` 1 real / 0 pad, or None (no pads).
        instruction_mask: ``[B, L]`` bool, the instruction (query) tokens; default
            :func:`default_instruction_mask`. Must not overlap visual tokens; a sample with visual
            tokens needs at least one.
        padding_side: ``"left"``/``"right"`` for the output; default: the input's side
            (left when every sample ends with a real token, so also without pads).

    Returns:
        :class:`PrunedInputs`. Samples without visual tokens pass through unchanged (minus pads).
    """
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        raise ValueError(
            "inputs_embeds must be a [B, L, H] tensor, got "
            f"{getattr(inputs_embeds, 'shape', type(inputs_embeds).__name__)}"
        )
    if inputs_embeds.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"inputs_embeds must be float32/float16/bfloat16, got {inputs_embeds.dtype}"
        )
    if not isinstance(layer0, Layer0):
        raise TypeError(f"layer0 must be a Layer0, got {type(layer0).__name__}")
    if not isinstance(config, TokenPruneConfig):
        raise TypeError(f"config must be a TokenPruneConfig, got {type(config).__name__}")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be None, 'left' or 'right', got {padding_side!r}")
    b, length, hidden = inputs_embeds.shape
    device = inputs_embeds.device
    visual = _check_bool_mask("visual_mask", visual_mask, (b, length)).to(device)
    if attention_mask is None:
        real = torch.ones(b, length, dtype=torch.bool, device=device)
        mask_dtype = torch.int64
    else:
        if attention_mask.dim() != 2:
            raise ValueError(
                "attention_mask must be a 2-D [B, L] padding mask (1 real / 0 pad), got "
                f"{attention_mask.dim()}-D"
            )
        real = _check_bool_mask("attention_mask", attention_mask, (b, length)).to(device)
        mask_dtype = attention_mask.dtype
    if position_ids is None:
        position_ids = (real.to(torch.int64).cumsum(-1) - 1).masked_fill(~real, 0)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (2, 3):
        raise ValueError("position_ids must be [B, L] or [R, B, L]")
    if tuple(position_ids.shape[-2:]) != (b, length):
        raise ValueError(
            f"position_ids must end in [B, L] = [{b}, {length}], got {list(position_ids.shape)}"
        )
    position_ids = position_ids.to(device)
    visual = visual & real
    if instruction_mask is None:
        instr = default_instruction_mask(visual, real)
    else:
        instr = _check_bool_mask("instruction_mask", instruction_mask, (b, length)).to(device)
        if bool((instr & visual).any()):
            raise ValueError("instruction_mask must not select visual tokens")
        instr = instr & real
    n_vis = visual.sum(1)
    n_instr = instr.sum(1)
    bad = ((n_vis > 0) & (n_instr == 0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"sample(s) {bad} have visual tokens but no instruction tokens: with the default rule "
            "the instruction is the text after the last visual token, so the prompt must not end "
            "with a visual token; or pass instruction_mask"
        )
    side = padding_side or _infer_padding_side(real)

    pos_l = torch.arange(length, device=device).expand(b, length)
    local = real.to(torch.int64).cumsum(1) - 1  # position among the sample's real tokens
    last_instr = torch.where(instr, local, torch.full_like(local, -1)).amax(1)
    last_vis = torch.where(visual, local, torch.full_like(local, -1)).amax(1)
    n_keys = torch.maximum(last_instr, last_vis) + 1  # keys: prefix up to both
    key_rows = real & (local < n_keys[:, None])

    with torch.no_grad():
        q = layer0.queries(inputs_embeds[instr], _rows_of(position_ids, instr))
        k = layer0.keys(inputs_embeds[key_rows], _rows_of(position_ids, key_rows))
        cu_real = _cu(real.sum(1))
        packed_pos = position_ids[real] if position_ids.dim() == 2 else position_ids[:, real]
        embeds, _, cu_out, src_idx, kept_idx, scores = tp.prune_and_merge(
            q,
            k,
            _cu(n_instr),
            _cu(key_rows.sum(1)),
            inputs_embeds[real],
            packed_pos,
            cu_real,
            inputs_embeds[visual],
            local[visual],
            _cu(n_vis),
            q_pos=local[instr],
            softmax_scale=layer0.scaling,
            **config.op_kwargs(device),
        )

    # Re-pad. Output row r of the packed result came from packed real row src_idx[r].
    out_len = (cu_out[1:] - cu_out[:-1]).to(torch.int64)
    new_len = int(out_len.max()) if b > 0 else 0
    src_pos = pos_l[real][src_idx]  # original position of each output row
    seg = torch.repeat_interleave(torch.arange(b, device=device), out_len)
    col = torch.arange(src_idx.numel(), device=device) - cu_out[:-1].to(torch.int64)[seg]
    if side == "left":
        col = col + (new_len - out_len)[seg]
    # Dummy for pads: the sample's first original pad if it has one, else position 0.
    dummy = torch.where(~real, pos_l, torch.full_like(pos_l, length)).amin(1)
    dummy = torch.where(dummy == length, torch.zeros_like(dummy), dummy)
    index = dummy[:, None].expand(b, new_len).clone()
    index[seg, col] = src_pos
    out_mask = torch.zeros(b, new_len, dtype=torch.bool, device=device)
    out_mask[seg, col] = True

    new_embeds = torch.gather(inputs_embeds, 1, index[..., None].expand(-1, -1, hidden))
    if not (torch.is_grad_enabled() and inputs_embeds.requires_grad):
        # The op's rows (the same values). With autograd on, the gather above is kept instead so
        # gradients reach the vision tower and the embeddings (the op is not differentiable).
        new_embeds[seg, col] = embeds
    if position_ids.dim() == 2:
        new_pos = torch.gather(position_ids, 1, index)
    else:
        new_pos = torch.gather(position_ids, 2, index[None].expand(position_ids.shape[0], -1, -1))
    keep_mask = torch.zeros(b, length, dtype=torch.bool, device=device)
    keep_mask[seg, src_pos] = True

    vis_pos = pos_l[visual]
    kept_counts = (keep_mask & visual).sum(1)
    kept_visual = list(torch.split(vis_pos[kept_idx], kept_counts.tolist()))
    score_list = list(torch.split(scores, n_vis.tolist()))
    return PrunedInputs(
        inputs_embeds=new_embeds,
        position_ids=new_pos,
        attention_mask=out_mask.to(mask_dtype),
        keep_mask=keep_mask,
        index=index,
        removed=(n_vis - kept_counts).to(torch.int64),
        kept_visual=kept_visual,
        scores=score_list,
        padding_side=side,
    )


def resolve_instruction_mask(
    spec: InstructionMaskSpec,
    input_ids: torch.Tensor | None,
    visual_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Turn the ``instruction_mask`` given to ``apply_tokenprune`` into a ``[B, L]`` mask.

    ``spec`` is None (the default rule, returns None), a ``[B, L]`` bool tensor (used as is; its
    shape must match the prompt), or a callable ``(input_ids | None, visual_mask [B, L] bool,
    attention_mask | None) -> [B, L] bool`` called at every prefill.
    """
    if spec is None:
        return None
    mask = spec(input_ids, visual_mask, attention_mask) if callable(spec) else spec
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            "instruction_mask must be None, a [B, L] bool tensor or a callable returning one, "
            f"got {type(mask).__name__}"
        )
    return _check_bool_mask("instruction_mask", mask, tuple(visual_mask.shape[:2]))


# --------------------------------------------------------------------------------------------
# Patch and generation bookkeeping
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationState:
    """What a pruned prefill leaves for the calls that continue from its KV cache.

    Attributes:
        full_length: ``L``, the unpruned prompt width.
        pruned_length: ``L'``, the pruned prompt width (= the cache length after prefill).
        attention_mask: ``[B, L']`` the pruned prompt's mask.
        removed: ``[B]`` int64 tokens removed per sample.
        pruned: the full :class:`PrunedInputs` of the prefill.
    """

    full_length: int
    pruned_length: int
    attention_mask: torch.Tensor
    removed: torch.Tensor
    pruned: PrunedInputs
    _cache_ref: Any = field(default=None, repr=False)

    def bind_cache(self, cache: Any) -> None:
        """Remember the cache object the prefill filled (weakly when possible)."""
        if cache is None:
            self._cache_ref = None
            return
        try:
            self._cache_ref = weakref.ref(cache)
        except TypeError:
            self._cache_ref = lambda: cache

    def continues(self, past_key_values: Any) -> bool:
        """True when a call with ``past_key_values`` continues from this prefill: the same
        cache object, holding at least the pruned prompt."""
        if past_key_values is None or self._cache_ref is None:
            return False
        if self._cache_ref() is not past_key_values:
            return False
        return _cache_length(past_key_values) >= self.pruned_length

    def translate_attention_mask(
        self, attention_mask: torch.Tensor | None, past_length: int, query_length: int
    ) -> torch.Tensor | None:
        """Map a continuation's mask to the pruned frame.

        Args:
            attention_mask: ``[B, W]`` with ``W = L + n`` (unpruned frame, as ``generate()``
                keeps it) or ``W = L' + n`` (already pruned), where ``n`` = tokens after the
                prompt including this call's; or None.
            past_length: the cache length before this call.
            query_length: tokens in this call.

        Returns:
            ``[B, L' + n]`` or None (no mask and no pads).
        """
        n = past_length - self.pruned_length + query_length
        if attention_mask is None:
            if not bool((self.attention_mask == 0).any()):
                return None
            b = self.attention_mask.shape[0]
            return torch.cat([self.attention_mask, self.attention_mask.new_ones(b, n)], dim=-1)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise NotImplementedError(
                "token pruning needs a 2-D attention_mask during decoding; compileable (static) "
                "caches make generate() build 4-D masks for the unpruned length: use the default "
                "DynamicCache"
            )
        w = attention_mask.shape[-1]
        if w == self.pruned_length + n:
            return attention_mask
        if w != self.full_length + n:
            raise ValueError(
                f"attention_mask has {w} columns; continuing a pruned prompt of {self.full_length} "
                f"tokens ({self.pruned_length} after pruning) with {n} new tokens expects "
                f"{self.full_length + n} (unpruned) or {self.pruned_length + n} (pruned)"
            )
        head = self.attention_mask.to(device=attention_mask.device, dtype=attention_mask.dtype)
        return torch.cat([head, attention_mask[:, self.full_length :]], dim=-1)


def _cache_length(cache: Any) -> int:
    try:
        return int(cache.get_seq_length())
    except Exception:  # pragma: no cover - legacy caches
        return 0


def cache_length(cache: Any) -> int:
    """Tokens held by a transformers ``Cache`` (0 for None)."""
    return 0 if cache is None else _cache_length(cache)


class TokenPrunePatch:
    """The state of one patched model instance, stored as ``model._tokenprune_patch``.

    Attributes:
        family: the family module name (``"qwen"``, ``"llava"``).
        config: the current :class:`TokenPruneConfig` (replaced by a second apply).
        instruction_mask: the ``instruction_mask`` spec given to ``apply_tokenprune``.
        generation: the :class:`GenerationState` of the last pruned prefill, or None.
        last: the :class:`PrunedInputs` of the last pruned prefill, or None.
        scratch: per-call values a family passes between its wrappers.
    """

    def __init__(
        self, family: str, config: TokenPruneConfig, instruction_mask: InstructionMaskSpec
    ) -> None:
        self.family = family
        self.config = config
        self.instruction_mask = instruction_mask
        self.generation: GenerationState | None = None
        self.last: PrunedInputs | None = None
        self.scratch: dict[str, Any] = {}
        self._saved: list[tuple[Any, str, bool, Any]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an INSTANCE attribute, remembering what was there for :meth:`restore`."""
        had = name in vars(obj)
        self._saved.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def restore(self) -> None:
        """Undo every :meth:`set_attr`, newest first."""
        for obj, name, had, old in reversed(self._saved):
            if had:
                setattr(obj, name, old)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
        self._saved.clear()
        self.generation = None
        self.last = None
        self.scratch.clear()


def get_patch(model: nn.Module) -> TokenPrunePatch | None:
    """The :class:`TokenPrunePatch` of a patched model, else None."""
    patch = vars(model).get(PATCH_ATTR)
    return patch if isinstance(patch, TokenPrunePatch) else None


def attach_patch(model: nn.Module, patch: TokenPrunePatch) -> None:
    """Store ``patch`` on the instance (plain attribute, not a submodule)."""
    object.__setattr__(model, PATCH_ATTR, patch)


def detach_patch(model: nn.Module) -> TokenPrunePatch | None:
    """Restore and remove the patch of ``model``; returns it (None when not patched)."""
    patch = get_patch(model)
    if patch is None:
        return None
    patch.restore()
    vars(model).pop(PATCH_ATTR, None)
    return patch


__all__ = [
    "PATCH_ATTR",
    "SUPPORTED_TRANSFORMERS",
    "GenerationState",
    "InstructionMaskSpec",
    "Layer0",
    "PrunedInputs",
    "TokenPruneConfig",
    "TokenPrunePatch",
    "attach_patch",
    "cache_length",
    "check_transformers_version",
    "default_instruction_mask",
    "detach_patch",
    "get_patch",
    "prune_inputs",
    "resolve_instruction_mask",
]
