"""Analytic prefill FLOPs of the language model under each pruning method, and the keep count
at which an in-LLM method (FastV-like) spends a given budget.

Counted (a multiply-add is 2 FLOPs), per decoder layer on a causal sequence of ``n`` tokens:

- projections: ``2 n H (Hq + 2 Hk) D`` (Q, K, V) + ``2 n Hq D H`` (O);
- attention: ``QK^T`` and ``AV`` over the causal pairs, ``2 * 2 Hq D * n (n + 1) / 2``;
- MLP (gated, three matrices): ``3 * 2 n H I``.

Norms, rotary, softmax, the embedding lookup and the last position's LM head are not counted
(the same for every method, or negligible). An input-pruning method runs every layer on the
``n - n_v + k`` kept tokens; an in-LLM method with pruning point ``K`` runs layers ``0 .. K-1``
on all ``n`` and the rest on ``n - n_v + k``.

Selection overhead (counted separately; the evaluation adds it per method):

- ours (layer-0 attention rows): layer 0's Q projection of the instruction tokens, its K
  projection of every key they see, and their ``QK^T`` over their causal prefix; the mapper adds
  its convolutions per visual token (depthwise ``2 C_in K_w`` + pointwise ``2 C_in C_out`` per
  block, ``2 C_last`` for the head);
- FastV-like: layer ``K``'s K projection of all ``n`` tokens (the layer itself then runs on the
  kept ones), the last token's Q projection and its ``QK^T`` over ``n`` keys;
- spread methods (``mapper_spread``, ``attention_spread``): their score source's overhead; the
  spread rule adds at most ``(2r + 1)^2 - 1`` integer neighbour checks per visual token and no
  floating-point work (0);
- DivPrune-like: the ``n_v x n_v`` cosine Gram matrix ``2 n_v^2 H``; DART-like: ``2 n_v p H``
  against ``p`` pivots; random, uniform: 0; oracle: its labels are not counted (an upper bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LMShape:
    """The language model's sizes that its prefill FLOPs depend on.

    Attributes:
        hidden: ``H``; intermediate: ``I`` (MLP width); heads: ``Hq``; kv_heads: ``Hk``;
        head_dim: ``D``; layers: decoder layers ``L``.
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @classmethod
    def from_config(cls, config: Any) -> LMShape:
        """From a (text) config with ``hidden_size``, ``intermediate_size``,
        ``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers`` (and optionally
        ``head_dim``); a multimodal config's ``text_config`` is used when present."""
        c = getattr(config, "text_config", None) or config
        heads = int(c.num_attention_heads)
        head_dim = getattr(c, "head_dim", None) or int(c.hidden_size) // heads
        return cls(
            hidden=int(c.hidden_size),
            intermediate=int(c.intermediate_size),
            heads=heads,
            kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            layers=int(c.num_hidden_layers),
        )


def layer_flops(shape: LMShape, n: int) -> int:
    """FLOPs of one decoder layer on a causal sequence of ``n`` tokens (see the module doc)."""
    h, d = shape.hidden, shape.head_dim
    proj = 2 * n * h * (shape.heads + 2 * shape.kv_heads) * d + 2 * n * shape.heads * d * h
    attn = 2 * shape.heads * d * n * (n + 1)
    mlp = 6 * n * h * shape.intermediate
    return proj + attn + mlp


def prefill_flops(shape: LMShape, n: int, n_visual: int = 0, keep: int | None = None,
                  layer: int = 0) -> int:  # fmt: skip
    """Decoder FLOPs of one prefill: layers ``< layer`` on all ``n`` tokens, the others on the
    ``n - n_visual + keep`` kept ones (``keep`` None: no pruning). ``layer`` 0 is input
    pruning; selection overhead is not included (:func:`selection_flops`)."""
    if not 0 <= layer <= shape.layers:
        raise ValueError(f"layer must be in [0, {shape.layers}], got {layer}")
    if keep is None:
        keep = n_visual
    if not 0 <= keep <= n_visual <= n:
        raise ValueError(f"need 0 <= keep <= n_visual <= n, got {keep}, {n_visual}, {n}")
    pruned = n - n_visual + keep
    return layer * layer_flops(shape, n) + (shape.layers - layer) * layer_flops(shape, pruned)


def mapper_flops(channels: Sequence[int], kernel_size: int, n_visual: int,
                 in_channels: int = 1) -> int:  # fmt: skip
    """FLOPs of the depthwise-separable conv mapper on ``n_visual`` tokens (norms and
    activations not counted)."""
    per_token = 0
    c_in = in_channels
    for c_out in channels:
        per_token += 2 * c_in * kernel_size + 2 * c_in * c_out
        c_in = c_out
    return n_visual * (per_token + 2 * c_in)


def layer0_rows_flops(shape: LMShape, query_positions: Sequence[int]) -> int:
    """FLOPs of the layer-0 instruction rows: Q projection of the queries at
    ``query_positions`` (0-based sequence positions), K projection of the keys ``0 .. max``,
    ``QK^T`` of each query over its causal prefix."""
    if not query_positions:
        return 0
    h, d = shape.hidden, shape.head_dim
    n_keys = max(query_positions) + 1
    q = 2 * len(query_positions) * h * shape.heads * d
    k = 2 * n_keys * h * shape.kv_heads * d
    s = 2 * shape.heads * d * sum(p + 1 for p in query_positions)
    return q + k + s


def fastv_scoring_flops(shape: LMShape, n: int) -> int:
    """FLOPs of FastV's ranking at its layer: K projection of all ``n`` tokens, Q projection of
    the last one and its ``QK^T`` over the ``n`` keys."""
    h, d = shape.hidden, shape.head_dim
    return 2 * n * h * shape.kv_heads * d + 2 * h * shape.heads * d + 2 * shape.heads * d * n


def fastv_flops(shape: LMShape, n: int, n_visual: int, keep: int, layer: int) -> int:
    """Total FLOPs of the FastV-like prefill (layers + its scoring overhead)."""
    return prefill_flops(shape, n, n_visual, keep, layer) + fastv_scoring_flops(shape, n)


def fastv_keep_for_budget(
    shape: LMShape, n: int, n_visual: int, budget: float, layer: int
) -> int | None:
    """The largest keep count ``k`` in ``[1, n_visual]`` whose :func:`fastv_flops` is at most
    ``budget`` (FLOPs), or None when even ``k = 1`` costs more (the budget is unreachable
    for pruning point ``layer``)."""
    if n_visual < 1:
        raise ValueError(f"n_visual must be >= 1, got {n_visual}")

    def cost(k: int) -> int:
        return fastv_flops(shape, n, n_visual, k, layer)

    if cost(1) > budget:
        return None
    lo, hi = 1, n_visual  # cost(lo) <= budget; find the largest such k (cost grows with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


__all__ = [
    "LMShape",
    "fastv_flops",
    "fastv_keep_for_budget",
    "fastv_scoring_flops",
    "layer0_rows_flops",
    "layer_flops",
    "mapper_flops",
    "prefill_flops",
]
