"""Trainable mapper: :class:`MapperConfig` and the :class:`TokenMapper` module.

The module's parameters are exactly the flat list of ``docs/contract.md`` stage b, with the same
names as :func:`mapper_param_names` and the same shapes (the pointwise convolutions are
``nn.Linear`` layers, whose ``[C_out, C_in]`` weights are the op's layout), so
``model.state_dict()`` is what :func:`save_mapper` writes and :meth:`TokenMapper.op_params` is
what ``torch.ops.tokenprune.mapper_forward`` takes.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .functional import (
    LAYER_NORM_EPS,
    _mapper_trunk,
    mapper_features,
    mapper_forward_ref,
    mapper_param_names,
)

__all__ = ["CONFIG_FORMAT_VERSION", "MapperConfig", "TokenMapper"]

#: Version of the dict written by :meth:`MapperConfig.to_dict` for a mapper with more input than
#: the head-mean attention (version 1, the paper's input, is still written for those); bump on
#: incompatible changes.
CONFIG_FORMAT_VERSION = 2

_CONFIG_FIELDS = ("channels", "kernel_size", "input_eps")
_INPUT_FIELDS = ("attention_channels", "grid")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class MapperConfig:
    """Shape of a mapper.

    Attributes:
        channels: output widths of the blocks, ``C_1, ..., C_last`` (the input has 1 channel);
            the method's default is 5 blocks ``(32, 64, 128, 256, 512)``. Any non-empty sequence
            of positive ints is accepted and stored as a tuple.
        kernel_size: odd depthwise kernel width ``K >= 1`` ('same' zero padding ``K // 2``).
        input_eps: ``> 0``; the input feature of a sample of ``n`` tokens is
            ``log(n * attn + input_eps)``.
        attention_channels: ``G``, the attention input's channels: 1 (the paper's input, the
            mean over every query head) or the per-head-group means
            ``instruction_attention(..., head_groups=G)`` (``G`` = the model's KV heads: one
            channel per GQA group); ``G`` must divide the model's query heads.
        grid: whether each token's normalised grid row and column are 2 more input channels.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    kernel_size: int = 5
    input_eps: float = 1e-4
    attention_channels: int = 1
    grid: bool = False

    def __post_init__(self) -> None:
        channels = self.channels
        if isinstance(channels, (str, bytes)) or not hasattr(channels, "__iter__"):
            raise ValueError(f"channels must be a sequence of positive ints, got {channels!r}")
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels must hold at least one block width, got ()")
        for i, c in enumerate(channels):
            if not _is_int(c) or c < 1:
                raise ValueError(f"channels[{i}] must be a positive int, got {c!r}")
        object.__setattr__(self, "channels", tuple(int(c) for c in channels))

        k = self.kernel_size
        if not _is_int(k) or k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {k!r}")
        object.__setattr__(self, "kernel_size", int(k))

        eps = self.input_eps
        if (
            isinstance(eps, bool)
            or not isinstance(eps, numbers.Real)
            or not math.isfinite(eps)
            or eps <= 0
        ):
            raise ValueError(f"input_eps must be a finite float > 0, got {eps!r}")
        object.__setattr__(self, "input_eps", float(eps))

        g = self.attention_channels
        if not _is_int(g) or g < 1:
            raise ValueError(f"attention_channels must be an int >= 1, got {g!r}")
        object.__setattr__(self, "attention_channels", int(g))
        if not isinstance(self.grid, bool):
            raise ValueError(f"grid must be a bool, got {self.grid!r}")

    @property
    def in_channels(self) -> int:
        """Input channels of the first block: ``attention_channels`` (+ 2 with ``grid``)."""
        return self.attention_channels + (2 if self.grid else 0)

    @property
    def paper_input(self) -> bool:
        """True for the paper's input: the head-mean attention alone (``attn [Tv]``)."""
        return self.attention_channels == 1 and not self.grid

    @property
    def num_blocks(self) -> int:
        """Number of conv blocks (``len(channels)``)."""
        return len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"format_version": 1, "channels", "kernel_size", "input_eps"}``
        for the paper's input (what every version reads), else ``format_version``
        :data:`CONFIG_FORMAT_VERSION` with ``attention_channels`` and ``grid`` too."""
        out: dict[str, Any] = {
            "format_version": 1,
            "channels": list(self.channels),
            "kernel_size": self.kernel_size,
            "input_eps": self.input_eps,
        }
        if not self.paper_input:
            out["format_version"] = CONFIG_FORMAT_VERSION
            out["attention_channels"] = self.attention_channels
            out["grid"] = self.grid
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MapperConfig:
        """Inverse of :meth:`to_dict`.

        Raises ``ValueError`` for a missing or unsupported ``format_version``, unknown keys,
        missing keys or invalid values (every key of :meth:`to_dict` is required).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"mapper config must be a mapping, got {type(data).__name__}")
        if "format_version" not in data:
            raise ValueError(
                "mapper config has no 'format_version' "
                f"(expected {CONFIG_FORMAT_VERSION}); keys: {sorted(data)}"
            )
        version = data["format_version"]
        if not _is_int(version) or version not in (1, CONFIG_FORMAT_VERSION):
            raise ValueError(
                f"unsupported mapper config format_version {version!r}; this version of "
                f"tokenprune_kernels reads format_version 1 and {CONFIG_FORMAT_VERSION}"
            )
        fields = _CONFIG_FIELDS if version == 1 else (*_CONFIG_FIELDS, *_INPUT_FIELDS)
        known = {"format_version", *fields}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ValueError(f"unknown mapper config keys {unknown}; expected only {sorted(known)}")
        missing = [key for key in fields if key not in data]
        if missing:
            raise ValueError(f"mapper config is missing keys {missing}")
        channels = data["channels"]
        if not isinstance(channels, (list, tuple)):
            raise ValueError(f"mapper config 'channels' must be a list of ints, got {channels!r}")
        extra = {key: data[key] for key in _INPUT_FIELDS if key in data}
        return cls(
            channels=tuple(channels),
            kernel_size=data["kernel_size"],
            input_eps=data["input_eps"],
            **extra,
        )


class _MapperBlock(nn.Module):
    """Parameter holder of one block: depthwise conv -> pointwise conv -> LayerNorm (-> SiLU)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__()
        self.dw = nn.Conv1d(c_in, c_in, kernel_size, padding=kernel_size // 2, groups=c_in)
        self.pw = nn.Linear(c_in, c_out)  # pointwise conv1d, weight [C_out, C_in]
        self.norm = nn.LayerNorm(c_out, eps=LAYER_NORM_EPS)


class TokenMapper(nn.Module):
    """1-D depthwise-separable CNN that turns the layer-0 attention signal into token logits.

    Parameters are named as :func:`mapper_param_names` (``blocks.{i}.dw``, ``blocks.{i}.pw``,
    ``blocks.{i}.norm``, ``head``) with the op's shapes. Initialisation is PyTorch's default for
    ``nn.Conv1d`` / ``nn.Linear`` / ``nn.LayerNorm``, the head included: a fresh mapper gives small
    (|logit| ~ 0.5), non-constant logits, so it is directly usable for tests and benchmarks, and
    its softmax starts close to uniform for KL training.

    Two entry points compute the same function:

    - :meth:`forward` on padded training batches ``[B, N]`` with per-sample ``lengths``;
    - :meth:`forward_packed` on packed varlen batches ``[Tv]`` with ``cu_seqlens_v``, via
      :func:`mapper_forward_ref`.
    """

    def __init__(self, config: MapperConfig | None = None) -> None:
        super().__init__()
        self.config = MapperConfig() if config is None else config
        if not isinstance(self.config, MapperConfig):
            raise TypeError(f"config must be a MapperConfig, got {type(self.config).__name__}")
        widths = (self.config.in_channels, *self.config.channels)
        self.blocks = nn.ModuleList(
            _MapperBlock(c_in, c_out, self.config.kernel_size)
            for c_in, c_out in itertools.pairwise(widths)
        )
        self.head = nn.Linear(widths[-1], 1)  # pointwise conv1d C_last -> 1, weight [1, C_last]

    def extra_repr(self) -> str:
        c = self.config
        text = f"channels={c.channels}, kernel_size={c.kernel_size}, input_eps={c.input_eps}"
        if not c.paper_input:
            text += f", attention_channels={c.attention_channels}, grid={c.grid}"
        return text

    def op_params(self, detach: bool = True) -> list[Tensor]:
        """The parameters as the op's flat list (order of :func:`mapper_param_names`).

        Shapes already match the op (``pw`` weights ``[C_out, C_in]``, head ``[1, C_last]``).
        With ``detach=True`` (default, for inference and for ``torch.ops.tokenprune``) the tensors
        are detached views that share storage with the parameters; with ``detach=False`` they are
        the parameters themselves, so gradients flow.
        """
        params = [p for _, p in self.named_op_params()]
        return [p.detach() for p in params] if detach else params

    def named_op_params(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs in the op's order; names are :func:`mapper_param_names`."""
        named = dict(self.named_parameters())
        return [(name, named[name]) for name in mapper_param_names(self.config.num_blocks)]

    def forward(
        self, attn: Tensor, lengths: Tensor | None = None, grid: Tensor | None = None
    ) -> Tensor:
        """Logits of a padded batch.

        Args:
            attn: ``[B, N]`` float32 attention signal (``attention_channels == 1``) or
                ``[B, N, G]`` (``G = attention_channels``); row ``b`` holds ``lengths[b]`` valid
                tokens followed by padding (any values, NaN included: padding never reaches
                valid positions or gradients of the parameters).
            lengths: ``[B]`` integer tensor with ``0 <= lengths[b] <= N``, or None (all ``N``).
            grid: ``[B, N, 2]`` float32 normalised grid row and column of each token, when the
                config's ``grid`` is set (required then, refused otherwise).

        Returns:
            ``[B, N]`` float32 logits; positions ``>= lengths[b]`` are 0. Row ``b`` equals
            :func:`mapper_forward_ref` on its ``lengths[b]`` valid tokens (to float32 rounding):
            the input uses the sample's own ``n = lengths[b]``, and the padding is zeroed after the
            input transform and after every block, so each convolution sees exactly the
            sample's own zero padding.
        """
        if not isinstance(attn, Tensor):
            raise TypeError(f"attn must be a Tensor, got {type(attn).__name__}")
        if attn.dtype != torch.float32:
            raise TypeError(f"attn must be float32, got {attn.dtype}")
        c = self.config
        if c.attention_channels == 1:
            if attn.dim() != 2:
                raise ValueError(f"attn must be 2-D [B, N], got shape {list(attn.shape)}")
        elif attn.dim() != 3 or attn.shape[2] != c.attention_channels:
            raise ValueError(
                f"attn must be 3-D [B, N, {c.attention_channels}] (attention_channels), got "
                f"shape {list(attn.shape)}"
            )
        batch, width = attn.shape[:2]
        if c.grid:
            if not isinstance(grid, Tensor) or tuple(grid.shape) != (batch, width, 2):
                raise ValueError(
                    f"grid must be a [B, N, 2] = [{batch}, {width}, 2] tensor for a mapper with "
                    f"grid input, got {getattr(grid, 'shape', grid)!r}"
                )
        elif grid is not None:
            raise ValueError("grid must be None: this mapper takes no grid input")
        positions = torch.arange(width, device=attn.device)
        if lengths is None:
            n = torch.full((batch,), width, dtype=torch.float32, device=attn.device)
            valid = torch.ones(batch, width, dtype=torch.bool, device=attn.device)
        else:
            if not isinstance(lengths, Tensor):
                raise TypeError(f"lengths must be a Tensor or None, got {type(lengths).__name__}")
            if (
                lengths.dtype.is_floating_point
                or lengths.dtype.is_complex
                or (lengths.dtype == torch.bool)
            ):
                raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
            if lengths.shape != (batch,):
                raise ValueError(
                    f"lengths must have shape [B] = [{batch}], got {list(lengths.shape)}"
                )
            lengths = lengths.to(device=attn.device, dtype=torch.int64)
            if batch and (lengths.min() < 0 or lengths.max() > width):
                raise ValueError(
                    f"lengths must lie in [0, N] = [0, {width}], got {lengths.tolist()}"
                )
            n = lengths.to(torch.float32)
            valid = positions.unsqueeze(0) < lengths.unsqueeze(1)  # [B, N]
        if batch == 0 or width == 0:
            return attn.new_zeros(batch, width)

        # padding may hold NaN/negatives: drop it first
        mask = valid if attn.dim() == 2 else valid.unsqueeze(-1)
        signal = torch.where(mask, attn, 0.0)
        if grid is not None:
            grid = torch.where(valid.unsqueeze(-1), grid, 0.0)
        x = mapper_features(signal, n.unsqueeze(1).expand(batch, width), c.input_eps, grid)
        x = torch.where(valid.unsqueeze(-1), x, 0.0)
        logits = _mapper_trunk(x, valid, self.op_params(detach=False), c.kernel_size)
        return torch.where(valid, logits, 0.0)

    def forward_packed(
        self, attn: Tensor, cu_seqlens_v: Tensor, grid: Tensor | None = None
    ) -> Tensor:
        """Logits of a packed batch: ``attn [Tv]`` (or ``[Tv, G]``) float32, ``cu_seqlens_v
        [B + 1]``, ``grid [Tv, 2]`` when the config's ``grid`` is set -> ``[Tv]``.

        Calls :func:`mapper_forward_ref` with the live parameters (gradients flow).
        """
        c = self.config
        return mapper_forward_ref(
            attn, cu_seqlens_v, self.op_params(detach=False), c.kernel_size, c.input_eps, grid
        )
