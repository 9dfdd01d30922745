"""Computing the pruned LLM input: "layer-0 modules -> instruction queries and prefix keys ->
``torch.ops.tokenprune.prune_and_merge``", with no model forward involved.

- :class:`TokenPruneConfig`: keep ratio, keep count or keep mass (the adaptive budget), and the
  mapper (``None``: training-free
  mode, the score is the raw layer-0 instruction-to-visual attention).
- :class:`Layer0`: what is needed to compute the FIRST decoder layer's queries and keys from the
  LLM input embeddings (the model's own input norm, q/k projections, optional q/k norms and
  rotary embedding), e.g. from a transformers text model (:func:`layer0_from_text_model`). Nothing
  ever asks the model for ``output_attentions``.
- :func:`prune_packed`: the step on PACKED (varlen) tokens, ``[T, H]`` with per-sample offsets, as
  an engine without padded batches holds them (vLLM). It computes layer-0 queries for the
  instruction tokens only and keys for the prefix they see and calls the op.
- :func:`prune_inputs`: the same on a PADDED batch ``[B, L, H]``: drops the pads, calls
  :func:`prune_packed` and re-pads. Kept tokens keep their ORIGINAL position ids. Any model code
  (VILA1.5, or a LLaVA-style model without a transformers class) can call it in place of its
  ``masked_scatter`` + LLM call.
- :func:`default_instruction_mask` / :func:`packed_instruction_mask`: the default instruction rule,
  the real (non-pad) tokens after the LAST visual token of each sample (for a chat prompt: the
  user's question plus the assistant header the processor appends).
- :func:`check_instruction_mask` / :func:`resolve_instruction_mask`: the ``instruction_mask``
  argument of ``apply_tokenprune``.

Patching a model (which calls these at its visual-token merge) lives in ``patch.py``.
"""

from __future__ import annotations

import itertools
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import tokenprune_kernels as tp
from tokenprune_kernels.mapper import TokenMapper
from tokenprune_kernels.validation import MAX_SPREAD_RADIUS, check_keep

InstructionMaskSpec = (
    torch.Tensor
    | Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor | None], torch.Tensor]
    | None
)
"""What ``apply_tokenprune(instruction_mask=...)`` takes: None (the default rule), a ``[B, L]``
bool or integer tensor, or a callable ``(input_ids | None, visual_mask [B, L] bool,
attention_mask | None) -> [B, L] bool``."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _scalar(value: Any, integral: bool) -> int | float | None:
    """``value`` as a Python int (``integral``) or float when it is a real number: a
    :class:`numbers.Real` (int, float, Fraction, numpy integer/floating scalars) or a 0-d
    real-valued tensor; integral values only for ``integral``. None otherwise (bools too)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        if integral and value.is_floating_point():
            return None
        value = value.item()
    if isinstance(value, bool):
        return None
    if integral:
        return int(value) if isinstance(value, numbers.Integral) else None
    return float(value) if isinstance(value, numbers.Real) else None


#: The real-valued settings of :class:`TokenPruneConfig`: the interval each must lie in.
_RATIOS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "keep_ratio": ("(0, 1]", lambda r: 0.0 < r <= 1.0),
    "keep_mass": ("(0, 1]", lambda r: 0.0 < r <= 1.0),
    "min_keep_ratio": ("[0, 1]", lambda r: 0.0 <= r <= 1.0),
    "max_keep_ratio": ("(0, 1]", lambda r: 0.0 < r <= 1.0),
}


@dataclass(frozen=True)
class TokenPruneConfig:
    """How many visual tokens to keep and how to score them.

    Attributes:
        keep_ratio: fraction in ``(0, 1]``; per sample ``clamp(floor(r * n + 0.5), 1, n)``. Any
            real number is accepted - a :class:`numbers.Real` (int, float, ``Fraction``, numpy
            integer/floating scalars) or a 0-d real tensor - and stored as a Python float
            (``float(r)``: ``np.float32(0.1)`` is ``0.10000000149...``); bools are rejected.
        keep_count: tokens kept per sample (``>= 1``, at most the sample's visual tokens): a
            :class:`numbers.Integral` (int, numpy integer scalars) or a 0-d integer tensor, stored
            as a Python int; bools and floats (``3.0``) are rejected.
        mapper: ``None`` for the training-free mode (raw layer-0 attention is the score), or a
            :class:`~tokenprune_kernels.mapper.TokenMapper` (the paper's method).
        keep_mass: the adaptive budget, in ``(0, 1]``: each sample keeps its fewest top tokens
            whose predicted relevance sums to ``keep_mass`` (the mapper's softmax; without a
            mapper the layer-0 attention normalised per sample), see
            :func:`tokenprune_kernels.select_topk`. A real number, like ``keep_ratio``.
        min_keep_ratio, max_keep_ratio: with ``keep_mass``, each sample keeps at least
            ``max(1, round_half_up(min_keep_ratio * n))`` and at most
            ``max(1, round_half_up(max_keep_ratio * n))`` tokens (``0 <= min <= max <= 1``,
            ``max > 0``); real numbers, stored as floats.
        spread_radius: the spread rule of the selection (mapper v2's; ``select_topk``'s
            ``spread_radius``), an integer in ``[0, 64]``, 0 (default) for the plain top-k.
            With ``r > 0`` each sample visits its visual tokens best first and sets aside a
            token when a better token already taken is within Chebyshev distance ``r`` in the
            same image (or video frame), keeping the set-aside ones only after all the others.
            The coordinates come from the tokens' M-RoPE (t, h, w) position ids (Qwen VL; a
            segment is an image or a video frame: :func:`spread_coords`), so it needs
            multi-axis rotary position ids: models with 1-D RoPE (LLaVA, LLaVA-OneVision, VILA)
            refuse it (``apply_tokenprune`` at once; :func:`prune_inputs` when called).

    Exactly one of ``keep_ratio`` / ``keep_count`` / ``keep_mass`` is set.

    Raises:
        ValueError: none or several set, a value of another type or out of range.
        TypeError: ``mapper`` of another type.
    """

    keep_ratio: float | None = None
    keep_count: int | None = None
    mapper: TokenMapper | None = None
    keep_mass: float | None = None
    min_keep_ratio: float = 0.0
    max_keep_ratio: float = 1.0
    spread_radius: int = 0

    def __post_init__(self) -> None:
        given = [self.keep_ratio, self.keep_count, self.keep_mass]
        if sum(x is not None for x in given) != 1:
            raise ValueError(
                "exactly one of keep_ratio, keep_count and keep_mass must be given, got "
                f"keep_ratio={self.keep_ratio!r}, keep_count={self.keep_count!r}, "
                f"keep_mass={self.keep_mass!r}"
            )
        for name, (interval, inside) in _RATIOS.items():
            value = getattr(self, name)
            if value is None:
                continue
            r = _scalar(value, integral=False)
            if r is None:
                raise ValueError(
                    f"{name} must be a real number in {interval} (int, float, numpy scalar or 0-d "
                    f"tensor; not bool), got {value!r}"
                )
            if not inside(r):  # NaN fails too
                raise ValueError(f"{name} must be in {interval}, got {value!r}")
            object.__setattr__(self, name, r)
        if self.keep_count is not None:
            c = _scalar(self.keep_count, integral=True)
            if c is None or c < 1:
                raise ValueError(
                    "keep_count must be an int >= 1 (int, numpy integer or 0-d integer tensor; "
                    f"not bool), got {self.keep_count!r}"
                )
            object.__setattr__(self, "keep_count", c)
        r = _scalar(self.spread_radius, integral=True)
        if r is None or not 0 <= r <= MAX_SPREAD_RADIUS:
            raise ValueError(
                f"spread_radius must be an int in [0, {MAX_SPREAD_RADIUS}] (int, numpy integer or "
                f"0-d integer tensor; not bool), got {self.spread_radius!r}"
            )
        object.__setattr__(self, "spread_radius", r)
        # The rules between the values: the ops' own check (and message).
        check_keep(self.keep_ratio, self.keep_count, self.keep_mass, self.min_keep_ratio,
                   self.max_keep_ratio)  # fmt: skip
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
            "keep_mass": None if self.keep_mass is None else float(self.keep_mass),
            "min_keep_ratio": float(self.min_keep_ratio),
            "max_keep_ratio": float(self.max_keep_ratio),
            "spread_radius": int(self.spread_radius),
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
            the ``position_ids`` given to :func:`prune_packed` / :func:`prune_inputs`, restricted
            to the rows being projected.
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


def _apply_rotary_of(text_model: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The ``apply_rotary_pos_emb`` of the text model's own modeling module (Llama's otherwise)."""
    module = sys.modules.get(type(text_model).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
    return fn


def layer0_from_text_model(text_model: nn.Module) -> Layer0:
    """:class:`Layer0` of a transformers decoder stack (``LlamaModel``, ``Qwen2Model``, the
    ``Qwen*VLTextModel`` of Qwen VL models, or any module with ``layers[0]`` of that shape and a
    ``rotary_emb``).

    Args:
        text_model: the language model WITHOUT the lm_head (e.g. ``model.model.language_model``
            of LLaVA or Qwen2-VL, ``llm.model`` of a ``LlamaForCausalLM``).

    Returns:
        A :class:`Layer0` using the model's own ``layers[0].input_layernorm``,
        ``self_attn.{q_proj, k_proj, q_norm?, k_norm?}``, ``rotary_emb`` and the
        ``apply_rotary_pos_emb`` of its modeling module. Its rotary takes the position ids the
        text model's ``rotary_emb`` takes (``[1, T]`` for 1-D RoPE, ``[3, 1, T]`` for M-RoPE).
    """
    layers = getattr(text_model, "layers", None)
    rotary = getattr(text_model, "rotary_emb", None)
    if layers is None or len(layers) == 0 or rotary is None:
        raise ValueError(
            f"text_model must be a Llama/Qwen2-style decoder stack with .layers and .rotary_emb, "
            f"got {type(text_model).__name__}"
        )
    return Layer0.from_decoder_layer(layers[0], rotary, _apply_rotary_of(text_model))


# --------------------------------------------------------------------------------------------
# Pruned outputs
# --------------------------------------------------------------------------------------------


@dataclass
class PrunedPacked:
    """What :func:`prune_packed` returns (``T'`` output rows, ``Tv`` visual, ``Tk`` kept visual).

    Attributes:
        inputs_embeds: ``[T', H]`` (input dtype) the pruned packed sequence: every non-visual row
            and the kept visual rows of each sample, in their original order.
        position_ids: ``[T']`` or ``[R, T']`` (as given) their ORIGINAL position ids.
        cu_seqlens: ``[B+1]`` int64 offsets of the samples in the output.
        src_index: ``[T']`` int64, the input row each output row came from.
        visual_index: ``[Tv]`` int64, the input row of each visual token (ascending).
        cu_seqlens_visual: ``[B+1]`` int64 offsets of the samples' visual tokens.
        scores: ``[Tv]`` float32, the ranked score of each visual token (mapper output, or the
            raw layer-0 attention without a mapper).
        kept_index: ``[Tk]`` int64, the kept visual tokens as indices into the visual tokens
            (``visual_index``, ``scores``), ascending.
        cu_seqlens_kept: ``[B+1]`` int64 offsets of the samples' kept visual tokens.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    src_index: torch.Tensor
    visual_index: torch.Tensor
    cu_seqlens_visual: torch.Tensor
    scores: torch.Tensor
    kept_index: torch.Tensor
    cu_seqlens_kept: torch.Tensor

    @property
    def kept_rows(self) -> torch.Tensor:
        """``[Tk]`` int64, the input rows of the kept visual tokens (ascending)."""
        return self.visual_index[self.kept_index]


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


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def _check_bool_mask(name: str, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``mask`` as a bool tensor of ``shape`` (a trailing size-1 dim is dropped; integer masks
    are nonzero-true)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == len(shape) + 1 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if tuple(mask.shape) != shape:
        dims = "[B, L]" if len(shape) == 2 else "[T]"
        raise ValueError(f"{name} must have shape {dims} = {list(shape)}, got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must be a bool or integer tensor, got {mask.dtype}")
        mask = mask != 0
    return mask


def default_instruction_mask(
    visual_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    structural_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The default instruction tokens: the real (non-pad) tokens after the LAST visual token,
    except structural tokens.

    Args:
        visual_mask: ``[B, L]`` bool, True at visual tokens.
        attention_mask: ``[B, L]`` (1 real / 0 pad) or None (no pads).
        structural_mask: ``[B, L]`` bool or None: tokens that mark visual content rather than
            ask anything (Qwen's ``<|vision_end|>``), never instruction. A model family's are
            given by :func:`~tokenprune_kernels.transformers.default_instruction_mask_for`.

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
    if structural_mask is not None:
        structural = _check_bool_mask("structural_mask", structural_mask, (b, length))
        after = after & ~structural.to(after.device)
    return after


def _segments(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample of each packed row ``[T]``, its position within the sample ``[T]``), int64."""
    counts = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=cu.device), counts)
    local = torch.arange(total, device=cu.device) - cu[:-1][seg]
    return seg, local


def _segment_last(mask: torch.Tensor, seg: torch.Tensor, local: torch.Tensor, b: int):
    """Per sample, the largest ``local`` where ``mask`` holds, -1 where it never does: ``[B]``."""
    out = torch.full((b,), -1, dtype=torch.int64, device=local.device)
    vals = torch.where(mask, local, torch.full_like(local, -1))
    return out.scatter_reduce(0, seg, vals, reduce="amax", include_self=True)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(
            "cu_seqlens must be a 1-D [B+1] tensor of sample offsets, got "
            f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    values = cu_seqlens.tolist()
    if (
        not values
        or values[0] != 0
        or values[-1] != total
        or any(a > b for a, b in itertools.pairwise(values))
    ):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T = {total}, got {values}"
        )
    return cu_seqlens.to(device=device, dtype=torch.int64)


def packed_instruction_mask(
    visual_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    structural_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`default_instruction_mask` on packed tokens: per sample, the tokens after its last
    visual token, except structural tokens.

    Args:
        visual_mask: ``[T]`` bool, True at visual tokens.
        cu_seqlens: ``[B+1]`` int32/int64 sample offsets into the ``T`` packed tokens.
        structural_mask: ``[T]`` bool or None, tokens that are never instruction (e.g.
            ``torch.isin(token_ids, FamilySpec.structural_token_ids(config))``).

    Returns:
        ``[T]`` bool (False for every token of a sample without visual tokens).
    """
    if not isinstance(visual_mask, torch.Tensor):
        raise TypeError(f"visual_mask must be a torch.Tensor, got {type(visual_mask).__name__}")
    t = visual_mask.shape[0] if visual_mask.dim() > 0 else 0
    visual = _check_bool_mask("visual_mask", visual_mask, (t,))
    cu = _check_cu_seqlens(cu_seqlens, t, visual.device)
    seg, local = _segments(cu, t)
    last = _segment_last(visual, seg, local, cu.numel() - 1)[seg]
    after = (local > last) & (last >= 0)
    if structural_mask is not None:
        after = after & ~_check_bool_mask("structural_mask", structural_mask, (t,)).to(after.device)
    return after


# --------------------------------------------------------------------------------------------
# Pruning packed tokens, and a padded batch
# --------------------------------------------------------------------------------------------


def _cu(counts: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    cu[1:] = torch.cumsum(counts.to(torch.int64), 0)
    return cu


def visual_grid(
    position_ids: torch.Tensor, visual_mask: torch.Tensor, seg: torch.Tensor
) -> torch.Tensor:
    """The grid input of a mapper with grid positions: ``[Tv]`` visual tokens -> ``[Tv, 2]``
    float32, each token's normalised row ``(r + 0.5) / H`` and column ``(c + 0.5) / W`` in its
    image (``tokenprune_kernels.mapper.grid_positions``).

    Read from multi-axis rotary position ids ``[R, T]`` whose last two rows are the height and
    width positions (Qwen VL M-RoPE): an image is a run of consecutive visual tokens of one
    sample (``seg [T]``: the sample of each row); its ``r`` / ``c`` are the row / column ids less
    the run's smallest, ``H`` / ``W`` their ranges.

    Raises:
        ValueError: 1-D position ids (1-D RoPE carries no grid).
    """
    if position_ids.dim() != 2 or position_ids.shape[0] < 2:
        raise ValueError(
            "a mapper with grid input needs multi-axis rotary position ids [R, T] whose last two "
            "rows are the visual tokens' row and column (Qwen VL M-RoPE); this model's are "
            f"{list(position_ids.shape)}"
        )
    idx = visual_mask.nonzero().flatten()
    hw = position_ids[-2:, idx].to(torch.int64)  # [2, Tv]
    new_run = torch.ones_like(idx, dtype=torch.bool)
    new_run[1:] = (idx[1:] != idx[:-1] + 1) | (seg[idx[1:]] != seg[idx[:-1]])
    run = torch.cumsum(new_run.to(torch.int64), 0) - 1
    n_runs = int(run[-1]) + 1 if run.numel() else 0
    index = run.unsqueeze(0).expand(2, -1)
    lo = hw.new_full((2, n_runs), torch.iinfo(torch.int64).max)
    hi = hw.new_full((2, n_runs), torch.iinfo(torch.int64).min)
    lo = lo.scatter_reduce(1, index, hw, reduce="amin")
    hi = hi.scatter_reduce(1, index, hw, reduce="amax")
    size = (hi - lo + 1).gather(1, index).to(torch.float32)
    return ((hw - lo.gather(1, index)).to(torch.float32) + 0.5).div(size).T.contiguous()


def spread_coords(
    position_ids: torch.Tensor, visual_mask: torch.Tensor, seg: torch.Tensor
) -> torch.Tensor:
    """The spread rule's coordinates of the visual tokens: ``[Tv, 3]`` int64 (segment, row,
    col) from multi-axis rotary ids ``[R, T]`` whose last three rows are (t, h, w) (Qwen VL
    M-RoPE; ``[4, T]`` ids lead with a text row, not read). ``seg [T]``: the sample of each row.

    Row and column are the h and w ids. A segment is one image or one video frame: a new one
    starts where the visual tokens stop being consecutive (another item), where t changes (the
    next frame) or where (h, w) does not increase (a frame that shares its t with the previous
    one: Qwen2.5-VL's ``int(frame * tokens_per_second * second_per_grid_t)`` can repeat at high
    fps). Segments are numbered in sequence order, so the coordinates strictly increase within
    a sample as the op requires, whatever ids the next item starts at (Qwen2-VL / 2.5-VL start
    it ``max(h, w)`` above the previous item's start, which a long video's t can pass). In
    Qwen2-VL, Qwen2.5-VL and Qwen3-VL an image is one t with h and w in raster order, so each
    image is one segment; a video is one segment per frame (tokens of different frames never
    suppress each other).

    Raises:
        ValueError: 1-D position ids, or fewer than three rows (no (t, h, w) grid): models with
            1-D RoPE (LLaVA, LLaVA-OneVision, VILA).
    """
    if position_ids.dim() != 2 or position_ids.shape[0] < 3:
        raise ValueError(
            "spread_radius > 0 needs multi-axis rotary position ids [R >= 3, T] whose last three "
            "rows are the visual tokens' (t, h, w) (Qwen VL M-RoPE); this model's are "
            f"{list(position_ids.shape)}: models with 1-D RoPE (LLaVA, LLaVA-OneVision, VILA) "
            "carry no grid, use spread_radius=0"
        )
    idx = visual_mask.nonzero().flatten()
    new_item = torch.ones_like(idx, dtype=torch.bool)
    new_item[1:] = (idx[1:] != idx[:-1] + 1) | (seg[idx[1:]] != seg[idx[:-1]])
    return thw_spread_coords(position_ids[-3:, idx], new_item)


def thw_spread_coords(thw: torch.Tensor, new_item: torch.Tensor) -> torch.Tensor:
    """The rule of :func:`spread_coords` on the visual tokens' own ids: ``thw [3, Tv]`` int
    (t, h, w) in sequence order, ``new_item [Tv]`` bool True where a new image / video starts
    (a new run of visual tokens or a new sample). Returns ``[Tv, 3]`` int64 (segment, h, w):
    a new segment at each new item, t change or (h, w) that does not increase; segments are
    numbered 0, 1, ... in order. Shared by the vLLM plugin."""
    t, h, w = thw.to(torch.int64)
    new = new_item.clone()
    not_after = (h[1:] < h[:-1]) | ((h[1:] == h[:-1]) & (w[1:] <= w[:-1]))
    new[1:] |= (t[1:] != t[:-1]) | not_after
    return torch.stack([torch.cumsum(new.to(torch.int64), 0) - 1, h, w], 1)


def _rows_of(position_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Position ids of the packed rows selected by a ``[T]`` bool mask, in the layout
    Layer0.rotary takes: ``[1, n]`` for ``[T]`` ids, ``[R, 1, n]`` for ``[R, T]`` ids."""
    if position_ids.dim() == 1:
        return position_ids[rows].unsqueeze(0)
    return position_ids[:, rows].unsqueeze(1)


def prune_packed(
    inputs_embeds: torch.Tensor,
    cu_seqlens: torch.Tensor,
    visual_mask: torch.Tensor,
    instruction_mask: torch.Tensor,
    position_ids: torch.Tensor,
    layer0: Layer0,
    config: TokenPruneConfig,
) -> PrunedPacked:
    """Score the visual tokens of packed (varlen) samples from layer-0 attention, keep the top-k
    of each sample and build the pruned packed sequence.

    The engine-independent step "layer-0 modules -> instruction queries and prefix keys ->
    ``torch.ops.tokenprune.prune_and_merge``": no model forward is involved. For each sample,
    the queries are its instruction tokens and the keys its tokens up to the later of its last
    instruction and last visual token (causal: a query sees the keys at or before it). Samples
    without visual tokens pass through unchanged.

    Args:
        inputs_embeds: ``[T, H]`` float32/float16/bfloat16, the LLM input embeddings of the
            ``B`` samples packed back to back (no pads), visual features already in place.
        cu_seqlens: ``[B+1]`` int32/int64 sample offsets (``0 = cu[0] <= ... <= cu[B] = T``).
        visual_mask: ``[T]`` bool (or integer, nonzero = True), True at the visual tokens.
        instruction_mask: ``[T]`` bool (or integer), True at the instruction (query) tokens;
            must not overlap ``visual_mask``; every sample with visual tokens needs at least one.
            :func:`packed_instruction_mask` gives the default rule.
        position_ids: ``[T]`` (1-D RoPE) or ``[R, T]`` (e.g. M-RoPE t/h/w rows) int32/int64,
            the ids the model's rotary uses. ``layer0.rotary`` receives them per projected row
            set as ``[1, n]`` or ``[R, 1, n]``.
        layer0: the model's first layer (:class:`Layer0`; norm, q/k projections and rotary may
            be any callables of the documented shapes, e.g. an inference engine's own modules).
        config: :class:`TokenPruneConfig` (keep ratio or count, mapper).

    Returns:
        :class:`PrunedPacked`. Kept tokens keep their ORIGINAL position ids; the output rows
        are the op's (with autograd on and ``inputs_embeds.requires_grad``, the same rows taken
        by indexing instead, so that gradients reach the embeddings; the scores never carry
        gradients).

    Raises:
        ValueError: bad shapes or offsets, overlapping masks, a sample with visual tokens but
            no instruction tokens.
        TypeError: a float mask, non-float embeddings, non-integer offsets, a wrong
            ``layer0`` / ``config`` type.
    """
    _check_common(inputs_embeds, "[T, H]", layer0, config)
    t = inputs_embeds.shape[0]
    device = inputs_embeds.device
    cu = _check_cu_seqlens(cu_seqlens, t, device)
    b = cu.numel() - 1
    visual = _check_bool_mask("visual_mask", visual_mask, (t,)).to(device)
    instr = _check_bool_mask("instruction_mask", instruction_mask, (t,)).to(device)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (1, 2):
        raise ValueError(
            "position_ids must be [T] or [R, T], got "
            f"{getattr(position_ids, 'shape', type(position_ids).__name__)}"
        )
    if position_ids.shape[-1] != t:
        raise ValueError(f"position_ids must end in T = {t}, got {list(position_ids.shape)}")
    position_ids = position_ids.to(device)
    if bool((instr & visual).any()):
        raise ValueError("instruction_mask must not select visual tokens")

    seg, local = _segments(cu, t)
    n_vis = torch.bincount(seg[visual], minlength=b)
    n_instr = torch.bincount(seg[instr], minlength=b)
    bad = ((n_vis > 0) & (n_instr == 0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"sample(s) {bad} have visual tokens but no instruction tokens: with the default rule "
            "the instruction is the text after the last visual token (structural tokens such as "
            "Qwen's <|vision_end|> do not count), so the prompt needs text after its visual "
            "content; or pass instruction_mask"
        )
    last_instr = _segment_last(instr, seg, local, b)
    last_vis = _segment_last(visual, seg, local, b)
    n_keys = torch.maximum(last_instr, last_vis) + 1  # keys: the prefix up to both
    key_rows = local < n_keys[seg]
    mapper = config.mapper
    grid = visual_grid(position_ids, visual, seg) if mapper and mapper.config.grid else None
    coords = spread_coords(position_ids, visual, seg) if config.spread_radius > 0 else None

    with torch.no_grad():
        q = layer0.queries(inputs_embeds[instr], _rows_of(position_ids, instr))
        k = layer0.keys(inputs_embeds[key_rows], _rows_of(position_ids, key_rows))
        embeds, new_pos, cu_out, src_idx, kept_idx, scores = tp.prune_and_merge(
            q,
            k,
            _cu(n_instr),
            _cu(n_keys),
            inputs_embeds,
            position_ids,
            cu,
            inputs_embeds[visual],
            local[visual],
            _cu(n_vis),
            q_pos=local[instr],
            softmax_scale=layer0.scaling,
            mapper_grid=grid,
            spread_coords=coords,
            **config.op_kwargs(device),
        )
    if torch.is_grad_enabled() and inputs_embeds.requires_grad:
        # The op is not differentiable: the same rows by indexing, so gradients reach the vision
        # tower and the embeddings.
        embeds = inputs_embeds[src_idx]
    cu_out = cu_out.to(torch.int64)
    n_out = cu_out[1:] - cu_out[:-1]
    n_kept = n_out - (cu[1:] - cu[:-1]) + n_vis  # each sample keeps all its non-visual rows
    return PrunedPacked(
        inputs_embeds=embeds,
        position_ids=new_pos,
        cu_seqlens=cu_out,
        src_index=src_idx,
        visual_index=visual.nonzero().flatten(),
        cu_seqlens_visual=_cu(n_vis),
        scores=scores,
        kept_index=kept_idx,
        cu_seqlens_kept=_cu(n_kept),
    )


def _check_common(
    inputs_embeds: torch.Tensor, dims: str, layer0: Layer0, config: TokenPruneConfig
) -> None:
    """The checks :func:`prune_packed` and :func:`prune_inputs` share (``dims``: the expected
    layout of ``inputs_embeds``, one letter per dimension)."""
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != dims.count(",") + 1:
        raise ValueError(
            f"inputs_embeds must be a {dims} tensor, got "
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


def _infer_padding_side(real: torch.Tensor) -> str:
    """``left`` when every sample ends with a real token (or there are no pads), else ``right``."""
    if bool(real.all()) or bool(real[:, -1].all()):
        return "left"
    return "right"


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

    The generic entry point for padded batches: what model code calls instead of
    ``masked_scatter`` + LLM input (the visual features must already sit at the visual positions
    of ``inputs_embeds``). It packs the real tokens, runs :func:`prune_packed` and re-pads.

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
    _check_common(inputs_embeds, "[B, L, H]", layer0, config)
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
    side = padding_side or _infer_padding_side(real)

    packed_pos = position_ids[real] if position_ids.dim() == 2 else position_ids[:, real]
    packed = prune_packed(
        inputs_embeds[real],
        _cu(real.sum(1)),
        visual[real],
        instr[real],
        packed_pos,
        layer0,
        config,
    )

    # Re-pad. Output row r of the packed result came from packed real row src_index[r].
    cu_out = packed.cu_seqlens
    out_len = cu_out[1:] - cu_out[:-1]
    new_len = int(out_len.max()) if b > 0 else 0
    pos_l = torch.arange(length, device=device).expand(b, length)
    src_pos = pos_l[real][packed.src_index]  # original position of each output row
    seg = torch.repeat_interleave(torch.arange(b, device=device), out_len)
    col = torch.arange(packed.src_index.numel(), device=device) - cu_out[:-1][seg]
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
        # The op's rows (the same values). With autograd on, the gather above is kept (the op
        # is not differentiable).
        new_embeds[seg, col] = packed.inputs_embeds
    if position_ids.dim() == 2:
        new_pos = torch.gather(position_ids, 1, index)
    else:
        new_pos = torch.gather(position_ids, 2, index[None].expand(position_ids.shape[0], -1, -1))
    keep_mask = torch.zeros(b, length, dtype=torch.bool, device=device)
    keep_mask[seg, src_pos] = True

    n_vis = packed.cu_seqlens_visual[1:] - packed.cu_seqlens_visual[:-1]
    n_kept = packed.cu_seqlens_kept[1:] - packed.cu_seqlens_kept[:-1]
    vis_pos = pos_l[visual]
    kept_visual = list(torch.split(vis_pos[packed.kept_index], n_kept.tolist()))
    score_list = list(torch.split(packed.scores, n_vis.tolist()))
    return PrunedInputs(
        inputs_embeds=new_embeds,
        position_ids=new_pos,
        attention_mask=out_mask.to(mask_dtype),
        keep_mask=keep_mask,
        index=index,
        removed=(n_vis - n_kept).to(torch.int64),
        kept_visual=kept_visual,
        scores=score_list,
        padding_side=side,
    )


# --------------------------------------------------------------------------------------------
# The instruction_mask argument of apply_tokenprune
# --------------------------------------------------------------------------------------------


def check_instruction_mask(spec: Any) -> None:
    """Check the ``instruction_mask`` given to ``apply_tokenprune`` when it is applied.

    Accepted: None (the default rule), a ``[B, L]`` (or ``[B, L, 1]``) bool or integer tensor
    (its ``[B, L]`` must match each prompt; checked per call), or a callable
    ``(input_ids | None, visual_mask [B, L] bool, attention_mask | None) -> [B, L] bool``.

    Raises:
        TypeError: any other type, or a float/complex tensor.
        ValueError: a tensor of another rank.
    """
    if spec is None:
        return
    if isinstance(spec, torch.Tensor):
        if spec.dtype.is_floating_point or spec.dtype.is_complex:
            raise TypeError(f"instruction_mask must be a bool or integer tensor, got {spec.dtype}")
        if not (spec.dim() == 2 or (spec.dim() == 3 and spec.shape[-1] == 1)):
            raise ValueError(
                f"instruction_mask must be a [B, L] tensor, got shape {list(spec.shape)}"
            )
        return
    if not callable(spec):
        raise TypeError(
            "instruction_mask must be None, a [B, L] bool or integer tensor, or a callable "
            "(input_ids, visual_mask, attention_mask) -> [B, L] bool mask; got "
            f"{type(spec).__name__}"
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
