"""Synthetic label records: a learnable stand-in for real explanation labels.

For tests, demos and timing only; a mapper trained on them means nothing for a real model.
Each sample's attention signal is a spatially smooth random distribution over ``n`` tokens; its
label is a fixed local function of that signal (its local contrast: a 3-token average minus a
9-token average, plus a bonus at local maxima), times a random per-sample scale, with a little
noise. A mapper whose receptive field covers about 9 tokens can learn it, while raw attention
ranks tokens only partly like it (top-25% recall about 0.4), so training has something to beat.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tokenprune_kernels.labels import LabelRecord

__all__ = ["synthetic_record", "synthetic_records", "write_synthetic_labels"]


def _smooth(x: torch.Tensor, width: int) -> torch.Tensor:
    """Moving average of ``x`` (``[n]``) over ``width`` (odd) tokens, zero padded, same length."""
    kernel = torch.full((1, 1, width), 1.0 / width, dtype=x.dtype)
    return F.conv1d(x.view(1, 1, -1), kernel, padding=width // 2).view(-1)


def synthetic_record(
    n: int, generator: torch.Generator, sample_id: str = "0", noise: float = 0.1
) -> LabelRecord:
    """One synthetic sample of ``n >= 1`` tokens (``attn``, ``label``: ``[n]`` float32 >= 0)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    z = _smooth(torch.randn(n, generator=generator), 5) * 3.0
    attn = torch.softmax(z, 0) * 0.3  # the visual share of an instruction row's attention
    x = torch.log(n * attn + 1e-4)
    peak = torch.ones(n, dtype=torch.bool)
    peak[1:] &= x[1:] >= x[:-1]
    peak[:-1] &= x[:-1] >= x[1:]
    logit = 3.0 * _smooth(x, 3) - 4.0 * _smooth(x, 9) + 0.5 * peak.float()  # local contrast
    logit = logit + noise * torch.randn(n, generator=generator)
    scale = float(torch.empty(1).uniform_(0.5, 20.0, generator=generator))
    label = torch.softmax(logit, 0) * scale
    return LabelRecord(
        sample_id=sample_id,
        attn=attn.float(),
        label=label.float(),
        meta={"synthetic": True, "n_visual": n, "modality": "image"},
    )


def synthetic_records(
    num_samples: int,
    min_tokens: int = 16,
    max_tokens: int = 64,
    seed: int = 0,
    noise: float = 0.1,
) -> list[LabelRecord]:
    """``num_samples`` synthetic records with lengths uniform in ``[min_tokens, max_tokens]``.

    Ids are ``"syn-00000"``, ... Same arguments, same records (seeded ``torch.Generator``).
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(
            f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, "
            f"max_tokens={max_tokens}"
        )
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_samples):
        n = int(torch.randint(min_tokens, max_tokens + 1, (1,), generator=gen))
        out.append(synthetic_record(n, gen, f"syn-{i:05d}", noise))
    return out


def write_synthetic_labels(
    out_dir: str | os.PathLike[str],
    num_samples: int,
    min_tokens: int = 16,
    max_tokens: int = 64,
    seed: int = 0,
    shard_size: int = 256,
) -> None:
    """Write :func:`synthetic_records` as a label directory (:class:`ShardWriter`), for demos."""
    from tokenprune_kernels.labels import ShardWriter

    metadata = {
        "synthetic": True,
        "num_samples": num_samples,
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "seed": seed,
    }
    with ShardWriter(out_dir, shard_size=shard_size, metadata=metadata) as writer:
        for record in synthetic_records(num_samples, min_tokens, max_tokens, seed):
            if record.sample_id not in writer.done_ids():
                writer.add(record)
