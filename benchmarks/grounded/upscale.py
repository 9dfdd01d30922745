"""Depth up-scaling: a deeper grounded model that starts as a trained shallower one.

The trained decoder layers keep their weights and are spread evenly through the new depth (the
first at 0, the last at the top); every new layer is a fresh layer whose two residual-branch
output projections (``self_attn.o_proj`` and ``mlp.down_proj``) are zero, so it adds nothing
to the residual stream and the deeper model computes exactly what the shallow one did until
training moves it. Everything outside the decoder layers (vision tower, merger, embeddings,
final norm, tied head) is copied. The processor is today's :func:`build_processor`, whose
vocabulary extends the source's (same ids; the opt-in question types' words take spare
embedding rows). ``python3 -m benchmarks.grounded.train --init-from DIR
--layers N`` fine-tunes such a model; ``docs/grounded_training.md`` has the runs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenprune_kernels.grounded.model import build_model, build_processor, load_model_dir

_LAYER_KEY = re.compile(r"^(.*\.language_model\.layers\.)(\d+)(\..*)$")
ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
"""Parameters of a new layer set to zero (its residual branches' output projections)."""


def layer_placement(old: int, new: int) -> list[int]:
    """Positions of ``old`` trained layers in a stack of ``new`` layers: evenly spread, the
    first at 0 and the last at ``new - 1`` (``[0, 4, 9, 13]`` for 4 in 14).

    Raises:
        ValueError: ``old < 1`` or ``new < old``.
    """
    if old < 1 or new < old:
        raise ValueError(f"layer_placement needs 1 <= old <= new, got old={old}, new={new}")
    if old == 1:
        return [0]
    return [round(i * (new - 1) / (old - 1)) for i in range(old)]


def check_placement(placement: Sequence[int], old: int, new: int) -> list[int]:
    """``placement`` as a list after checking it places ``old`` layers in ``new``: strictly
    increasing indices in ``[0, new)``, one per source layer.

    Raises:
        ValueError: anything else.
    """
    p = [int(i) for i in placement]
    increasing = all(a < b for a, b in itertools.pairwise(p))
    if len(p) != old or not increasing or not 0 <= p[0] <= p[-1] < new:
        raise ValueError(
            f"placement must be {old} strictly increasing layer indices in [0, {new}), "
            f"got {list(placement)}"
        )
    return p


def depth_upscaled(
    source: str | Path, layers: int, seed: int = 0, placement: Sequence[int] | None = None
) -> tuple[Any, Any, list[int]]:
    """``(model, processor, placement)``: the model directory ``source`` deepened to ``layers``
    decoder layers (fp32, eval mode). ``placement[i]`` is the new index of source layer ``i``
    (default :func:`layer_placement`; any strictly increasing choice, :func:`check_placement`);
    new layers draw their weights from ``torch.manual_seed(seed)``
    with ``initializer_range`` of the source config, then :data:`ZEROED` are set to 0.

    Raises:
        ValueError: ``layers`` is below the source's depth, or a bad ``placement``.
    """
    old_model, old_processor = load_model_dir(source)
    processor = build_processor()
    vocab = processor.tokenizer.get_vocab()
    changed = [w for w, i in old_processor.tokenizer.get_vocab().items() if vocab.get(w) != i]
    if changed:
        raise ValueError(
            f"depth_upscaled: the tokenizer of {source} does not agree with build_processor() "
            f"on {sorted(changed)[:5]}"
        )
    if len(vocab) > old_model.config.text_config.vocab_size:
        raise ValueError(
            f"depth_upscaled: {len(vocab)} words do not fit the source's "
            f"{old_model.config.text_config.vocab_size} embedding rows"
        )
    text = old_model.config.text_config
    old = int(text.num_hidden_layers)
    placement = (
        layer_placement(old, layers)
        if placement is None
        else check_placement(placement, old, layers)
    )
    cfg_dict = old_model.config.to_dict()
    tc = cfg_dict["text_config"]
    tc["num_hidden_layers"] = layers
    if tc.get("layer_types") is not None:
        kinds = set(tc["layer_types"])
        if len(kinds) != 1:
            raise ValueError(f"depth_upscaled needs one layer type, source has {sorted(kinds)}")
        tc["layer_types"] = [kinds.pop()] * layers
    config = type(old_model.config).from_dict(cfg_dict)
    model = build_model(config, seed=seed)
    new_of_old = dict(enumerate(placement))
    state = {}
    for key, value in old_model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m:
            key = f"{m.group(1)}{new_of_old[int(m.group(2))]}{m.group(3)}"
        state[key] = value
    fresh = model.state_dict()
    kept = set(placement)
    for key, value in fresh.items():
        m = _LAYER_KEY.match(key)
        if m is None or int(m.group(2)) in kept:
            continue
        state[key] = torch.zeros_like(value) if m.group(3)[1:] in ZEROED else value
    missing = set(fresh) - set(state)
    unexpected = set(state) - set(fresh)
    if missing or unexpected:  # pragma: no cover - a transformers layout change
        raise RuntimeError(
            f"depth_upscaled: key mismatch (missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]})"
        )
    model.load_state_dict(state, strict=True)
    return model.eval(), processor, placement
