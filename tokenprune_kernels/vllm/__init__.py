"""vLLM plugin: visual-token pruning inside ``vllm serve`` / ``vllm.LLM`` (out of tree).

Registered through the entry point ``vllm.general_plugins`` (``tokenprune =
tokenprune_kernels.vllm:register``), which vLLM runs in each of its processes. It adds model
architectures that subclass vLLM's own (:data:`ARCHITECTURES`); a model is switched to one of
them, with its settings, by ``hf_overrides``::

    vllm serve Qwen/Qwen2-VL-7B-Instruct --hf-overrides '{"architectures":
        ["TokenPruneQwen2VLForConditionalGeneration"], "tokenprune": {"keep_ratio": 0.5}}'

``"tokenprune": {"keep_ratio": r, "mapper": "/path/mapper.safetensors"}``: ``keep_ratio`` in
``(0, 1]`` (each image keeps ``clamp(floor(r * n + 0.5), 1, n)`` of its ``n`` visual tokens);
``mapper`` optional (without it the raw layer-0 attention ranks the tokens);
``spread_radius`` optional, an int in ``[0, 64]`` (the spread rule of ``select_topk``, on each
image's / video frame's (h, w) M-RoPE ids; 0, the default, keeps the top-scored tokens). Bad
settings fail at startup with a ``ValueError``. :func:`hf_overrides` builds the dict.

This module imports without vLLM; :mod:`tokenprune_kernels.vllm.qwen` (imported by vLLM when a
registered architecture is used) holds the model and processor classes and the design notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_KEY = "tokenprune"
"""The HF-config attribute (set through ``hf_overrides``) that holds the settings."""

ARCHITECTURES: dict[str, str] = {
    "TokenPruneQwen2VLForConditionalGeneration": (
        "tokenprune_kernels.vllm.qwen:TokenPruneQwen2VLForConditionalGeneration"
    ),
    "TokenPruneQwen2_5_VLForConditionalGeneration": (
        "tokenprune_kernels.vllm.qwen:TokenPruneQwen2_5_VLForConditionalGeneration"
    ),
    "TokenPruneQwen3VLForConditionalGeneration": (
        "tokenprune_kernels.vllm.qwen:TokenPruneQwen3VLForConditionalGeneration"
    ),
}
"""Architecture name -> ``module:Class``, as handed to ``ModelRegistry.register_model``."""

PRUNED_ARCHITECTURE: dict[str, str] = {
    "Qwen2VLForConditionalGeneration": "TokenPruneQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "TokenPruneQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "TokenPruneQwen3VLForConditionalGeneration",
}
"""vLLM's architecture -> ours."""


@dataclass(frozen=True)
class VllmPruneSettings:
    """The plugin's settings for one model.

    Attributes:
        keep_ratio: fraction of each image's visual tokens kept, in ``(0, 1]``.
        mapper: path of a ``.safetensors`` mapper (``tokenprune train-mapper``), or None.
        spread_radius: the spread rule's radius, an int in ``[0, 64]`` (0: none).
    """

    keep_ratio: float
    mapper: str | None = None
    spread_radius: int = 0

    def kept_count(self, n: int) -> int:
        """Visual tokens an image of ``n`` tokens keeps: ``clamp(floor(r * n + 0.5), 1, n)``
        (the ops' rule, in float64), 0 for ``n == 0``."""
        if n <= 0:
            return 0
        return min(max(math.floor(self.keep_ratio * n + 0.5), 1), n)


#: The settings of the adaptive budget (``apply_tokenprune(keep_mass=...)``), refused here.
ADAPTIVE_SETTINGS = ("keep_mass", "min_keep_ratio", "max_keep_ratio")


def settings_from_config(hf_config: Any) -> VllmPruneSettings:
    """Read and check the settings stored on a model's HF config under :data:`CONFIG_KEY`.

    Raises:
        ValueError: the key is missing or not a dict, an adaptive-budget key (``keep_mass``, its
            ratios: the placeholder counts are fixed before scoring), an unknown key,
            ``keep_ratio`` missing or outside ``(0, 1]``, ``mapper`` not a path to an existing
            ``.safetensors`` file, or ``spread_radius`` not an int in ``[0, 64]``.
    """
    raw = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(raw, dict):
        raise ValueError(
            f"tokenprune: the model config has no '{CONFIG_KEY}' settings; pass "
            f'--hf-overrides \'{{"{CONFIG_KEY}": {{"keep_ratio": 0.5}}, ...}}\' '
            f"(got {raw!r})"
        )
    adaptive = sorted(set(raw) & set(ADAPTIVE_SETTINGS))
    if adaptive:
        raise ValueError(
            f"tokenprune: {', '.join(adaptive)} (the adaptive keep budget) is not supported by the "
            "vLLM plugin: vLLM fixes each image's number of placeholder tokens before the prompt "
            "is scored, so the kept count cannot depend on the scores; use keep_ratio here "
            "(keep_mass works with transformers: apply_tokenprune(model, keep_mass=...))"
        )
    unknown = sorted(set(raw) - {"keep_ratio", "mapper", "spread_radius"})
    if unknown:
        raise ValueError(
            f"tokenprune: unknown settings {unknown}; expected keep_ratio, mapper, spread_radius"
        )
    spread = raw.get("spread_radius", 0)
    if isinstance(spread, bool) or not isinstance(spread, int) or not 0 <= spread <= 64:
        raise ValueError(f"tokenprune: spread_radius must be an int in [0, 64], got {spread!r}")
    r = raw.get("keep_ratio")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0):
        raise ValueError(f"tokenprune: keep_ratio must be in (0, 1], got {r!r}")
    mapper = raw.get("mapper")
    if mapper is not None:
        if not isinstance(mapper, str) or not mapper.endswith(".safetensors"):
            raise ValueError(
                f"tokenprune: mapper must be a path to a .safetensors file, got {mapper!r}"
            )
        if not Path(mapper).is_file():
            raise ValueError(f"tokenprune: mapper file not found: '{mapper}'")
    return VllmPruneSettings(keep_ratio=float(r), mapper=mapper, spread_radius=spread)


def hf_overrides(
    keep_ratio: float,
    mapper: str | None = None,
    architecture: str = "Qwen2VLForConditionalGeneration",
    spread_radius: int = 0,
) -> dict[str, Any]:
    """The ``hf_overrides`` that turn pruning on for a model of vLLM's ``architecture``.

    >>> hf_overrides(0.5)["architectures"]
    ['TokenPruneQwen2VLForConditionalGeneration']
    """
    if architecture not in PRUNED_ARCHITECTURE:
        raise ValueError(
            f"architecture must be one of {sorted(PRUNED_ARCHITECTURE)}, got {architecture!r}"
        )
    settings: dict[str, Any] = {"keep_ratio": keep_ratio}
    if mapper is not None:
        settings["mapper"] = str(mapper)
    if spread_radius:
        settings["spread_radius"] = int(spread_radius)
    return {"architectures": [PRUNED_ARCHITECTURE[architecture]], CONFIG_KEY: settings}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register :data:`ARCHITECTURES` (lazily, by
    ``module:Class``; nothing of the model code is imported here). Safe to call repeatedly."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)


__all__ = [
    "ARCHITECTURES",
    "CONFIG_KEY",
    "PRUNED_ARCHITECTURE",
    "VllmPruneSettings",
    "hf_overrides",
    "register",
    "settings_from_config",
]
