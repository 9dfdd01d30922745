"""Tiny in-process Qwen2-VL / Qwen2.5-VL / Qwen3-VL models, their inputs, and the oracle.

Nothing here imports ``tokenprune_kernels.transformers``. The oracle ("independent computation")
runs the UNPATCHED model with eager attention and ``output_attentions=True`` to read the layer-0
attention rows, scores and selects with ``tokenprune_kernels.reference`` (and
``mapper_forward_ref``), builds the pruned sequence by hand from the language model's inputs of an
unpatched run (embeddings after the merge, the model's own M-RoPE ids, deepstack features) and
runs the unpatched language model + lm_head on it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from tokenprune_kernels.grounded.model import qwen_vl_config
from tokenprune_kernels.mapper import grid_positions, mapper_forward_ref
from tokenprune_kernels.reference import select_topk_ref, spread_select_ref
from tokenprune_kernels.testing import oracle_keep_counts
from tokenprune_kernels.validation import KeepRule

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VOCAB = 128
PAD_ID = 0
IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 120, 121, 122, 123
TEXT_IDS = (3, 100)
PATCH, TPATCH, MERGE, CHANNELS = 2, 2, 2, 3
PATCH_DIM = CHANNELS * TPATCH * PATCH * PATCH

_CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def make_config(model_type: str):
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.08,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [2, 3, 3]},
    )
    if model_type == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    elif model_type == "qwen2_5_vl":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            window_size=8, fullatt_block_indexes=[1], tokens_per_second=2,
        )  # fmt: skip
    else:
        text.update(
            head_dim=16,
            rope_parameters={
                "rope_type": "default", "rope_theta": 1000.0,
                "mrope_section": [4, 2, 2], "mrope_interleaved": True,
            },
        )  # fmt: skip
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            num_position_embeddings=16, deepstack_visual_indexes=[0, 1],
        )  # fmt: skip
    vision.update(
        in_channels=CHANNELS, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TPATCH
    )
    cfg_cls, _ = _CLASSES[model_type]
    return qwen_vl_config(cfg_cls, text, vision, (IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID))


def make_model(model_type: str, attn: str = "sdpa", seed: int = 0):
    """A tiny random model in eval mode (fp32). Layer-0 q/k weights are scaled up so the
    layer-0 attention is far from flat (distinct scores at the top-k threshold)."""
    config = make_config(model_type)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = _CLASSES[model_type][1](config).eval()
    with torch.no_grad():
        attn0 = model.model.language_model.layers[0].self_attn
        attn0.q_proj.weight.mul_(3.0)
        attn0.k_proj.weight.mul_(3.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def eager_copy(model):
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m


@dataclass
class Sample:
    """Segments: ("text", n) | ("image", (h, w)) | ("video", (t, h, w)), grid in patches."""

    segments: list


def _tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(*TEXT_IDS, (n,), generator=gen).tolist()


def build_inputs(
    model_type: str, samples: list[Sample], gen: torch.Generator, side: str = "left"
) -> dict:
    """input_ids, attention_mask, mm_token_type_ids and pixel inputs, by hand (no processor)."""
    seqs, types = [], []
    images, image_grids, videos, video_grids = [], [], [], []
    for s in samples:
        ids: list[int] = []
        tt: list[int] = []
        for kind, arg in s.segments:
            if kind == "text":
                ids += _tokens(gen, arg)
                tt += [0] * arg
            elif kind == "image":
                h, w = arg
                n = h * w // MERGE**2
                ids += [VSTART_ID] + [IMAGE_ID] * n + [VEND_ID]
                tt += [0] + [1] * n + [0]
                images.append(torch.randn(h * w, PATCH_DIM, generator=gen))
                image_grids.append([1, h, w])
            else:
                t, h, w = arg
                per_frame = h * w // MERGE**2
                if model_type == "qwen3_vl":  # frames separated by timestamp text
                    for _ in range(t):
                        ids += [*_tokens(gen, 1), VSTART_ID] + [VIDEO_ID] * per_frame + [VEND_ID]
                        tt += [0, 0] + [2] * per_frame + [0]
                else:
                    ids += [VSTART_ID] + [VIDEO_ID] * (t * per_frame) + [VEND_ID]
                    tt += [0] + [2] * (t * per_frame) + [0]
                videos.append(torch.randn(t * h * w, PATCH_DIM, generator=gen))
                video_grids.append([t, h, w])
        seqs.append(ids)
        types.append(tt)
    length = max(len(x) for x in seqs)
    b = len(seqs)
    input_ids = torch.full((b, length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    mm = torch.zeros(b, length, dtype=torch.long)
    for i, (ids, tt) in enumerate(zip(seqs, types, strict=True)):
        n = len(ids)
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        input_ids[i, sl] = torch.tensor(ids)
        mm[i, sl] = torch.tensor(tt)
        mask[i, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm}
    if images:
        out["pixel_values"] = torch.cat(images)
        out["image_grid_thw"] = torch.tensor(image_grids)
    if videos:
        out["pixel_values_videos"] = torch.cat(videos)
        out["video_grid_thw"] = torch.tensor(video_grids)
    return out


def capture_lm_inputs(model, inputs: dict) -> dict:
    """The language model's keyword inputs in an unpatched forward (embeddings after the merge,
    the model's M-RoPE ids, Qwen3 deepstack features)."""
    seen: dict = {}

    def hook(_module, _args, kwargs):
        seen.update(kwargs)

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen


def oracle_kept(
    eager_model,
    inputs: dict,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
    mapper=None,
    instruction: torch.Tensor | None = None,
    gap: float = 1e-5,
    keep_mass: float | None = None,
    min_keep_ratio: float = 0.0,
    max_keep_ratio: float = 1.0,
    spread_radius: int = 0,
) -> list[torch.Tensor]:
    """Per sample, the original positions of the visual tokens to keep, from the unpatched eager
    model's layer-0 attention (instruction rows: ``instruction`` [B, L] or, by default, the real
    tokens after the last visual token except ``<|vision_start|>`` / ``<|vision_end|>``; the
    adaptive rule's counts by :func:`~tokenprune_kernels.testing.oracle_keep_counts`). With
    ``spread_radius > 0`` the selection is the spread rule's (``spread_select_ref``) on the
    tokens' (frame, row, col) from ``image_grid_thw`` / ``video_grid_thw``
    (:func:`grid_coords`), not from the position ids."""
    with torch.no_grad():
        att = eager_model(**inputs, output_attentions=True).attentions[0]  # [B, Hq, L, L]
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    visual = (ids == IMAGE_ID) | (ids == VIDEO_ID)
    rule = KeepRule(keep_ratio, keep_count, keep_mass, min_keep_ratio, max_keep_ratio)
    kept = []
    grids = list(inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist())
    coords = grid_coords(inputs) if spread_radius > 0 else None
    for b in range(ids.shape[0]):
        vpos = visual[b].nonzero().flatten()
        last = int(vpos.max())
        if instruction is None:
            instr = mask[b] & ~torch.isin(ids[b], torch.tensor([VSTART_ID, VEND_ID]))
            instr[: last + 1] = False
        else:
            instr = instruction[b] & mask[b]
        heads = att[b][:, instr][:, :, vpos].mean(dim=1).float().T  # [n_v, Hq]
        a = heads.mean(dim=1)
        cu = torch.tensor([0, vpos.numel()])
        if mapper is not None:
            c = mapper.config
            g = c.attention_channels
            x = a if g == 1 else heads.reshape(vpos.numel(), g, -1).mean(-1)
            grid = None
            if c.grid:  # images only: each run of visual tokens is the next image_grid_thw row
                starts = (vpos[1:] != vpos[:-1] + 1).sum().item() + 1
                parts = []
                for _ in range(starts):
                    t, h, w = grids.pop(0)
                    parts.append(grid_positions(h // MERGE, w // MERGE, t))
                grid = torch.cat(parts)
            with torch.no_grad():
                params = mapper.op_params()
                a = mapper_forward_ref(x, cu, params, c.kernel_size, c.input_eps, grid)
        k = oracle_keep_counts(a, cu, rule, softmax=mapper is not None)
        s = a.sort(descending=True).values
        if coords is None:
            idx, _ = select_topk_ref(a, cu, k)
            if int(k) < vpos.numel():
                assert float(s[int(k) - 1] - s[int(k)]) > gap, "near-tie at the top-k threshold"
        else:  # the whole order matters: no near-tie anywhere
            idx, _ = spread_select_ref(a, cu, k, coords[b], spread_radius)
            assert bool((s[:-1] - s[1:] > gap).all()), "near-tie in the selection order"
        kept.append(vpos[idx])
    return kept


def grid_coords(inputs: dict) -> list[torch.Tensor]:
    """Per sample, ``[n_v, 3]`` int64 (frame, row, col) of its visual tokens in sequence order,
    from ``image_grid_thw`` / ``video_grid_thw`` alone: each image, and each frame of a video,
    is the next frame number (counted over the batch), its tokens the merged grid
    ``(h / MERGE) x (w / MERGE)`` in raster order. Qwen3-VL's per-frame runs take a video's
    frames one run at a time."""
    ids = inputs["input_ids"]
    queues = {
        IMAGE_ID: list(inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist()),
        VIDEO_ID: list(inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist()),
    }
    frames_left = {IMAGE_ID: 0, VIDEO_ID: 0}
    shape = {IMAGE_ID: (0, 0), VIDEO_ID: (0, 0)}
    frame = 0
    out = []
    for b in range(ids.shape[0]):
        rows: list[tuple[int, int, int]] = []
        row = ids[b].tolist()
        i = 0
        while i < len(row):
            kind = row[i]
            if kind not in queues:
                i += 1
                continue
            if frames_left[kind] == 0:
                t, h, w = queues[kind].pop(0)
                frames_left[kind], shape[kind] = int(t), (int(h) // MERGE, int(w) // MERGE)
            gh, gw = shape[kind]
            rows += [(frame, r, c) for r in range(gh) for c in range(gw)]
            assert row[i : i + gh * gw] == [kind] * (gh * gw), "a frame's tokens are one run"
            frames_left[kind] -= 1
            frame += 1
            i += gh * gw
        out.append(torch.tensor(rows, dtype=torch.int64).reshape(-1, 3))
    return out


@dataclass
class HandPruned:
    embeds: torch.Tensor  # [B, L', H]
    position_ids: torch.Tensor  # [3, B, L']
    attention_mask: torch.Tensor  # [B, L']
    keep: list[torch.Tensor]  # per sample, original positions kept (in order)
    extra: dict  # visual_pos_masks / deepstack_visual_embeds for Qwen3
    next_pos: torch.Tensor  # [3, B] the position id of the first decoded token


def hand_prune(captured: dict, inputs: dict, kept: list[torch.Tensor], side: str) -> HandPruned:
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    visual = (ids == IMAGE_ID) | (ids == VIDEO_ID)
    emb = captured["inputs_embeds"]
    pos = captured["position_ids"]
    pos = pos[-3:] if pos.dim() == 3 else pos[None].expand(3, -1, -1)
    b, _, hdim = emb.shape
    keeps = []
    for i in range(b):
        k = mask[i] & ~visual[i]
        k[kept[i]] = True
        keeps.append(k.nonzero().flatten())
    new_len = max(k.numel() for k in keeps)
    pe = emb.new_zeros(b, new_len, hdim)
    pp = torch.zeros(3, b, new_len, dtype=pos.dtype)
    pm = torch.zeros(b, new_len, dtype=torch.long)
    vpm_new = torch.zeros(b, new_len, dtype=torch.bool)
    for i, k in enumerate(keeps):
        sl = slice(new_len - k.numel(), new_len) if side == "left" else slice(0, k.numel())
        pe[i, sl] = emb[i, k]
        pp[:, i, sl] = pos[:, i, k]
        pm[i, sl] = 1
        vpm_new[i, sl] = visual[i, k]
    extra = {}
    if captured.get("visual_pos_masks") is not None:
        vpm = captured["visual_pos_masks"]
        flat_keep = torch.zeros_like(vpm)
        for i, k in enumerate(keeps):
            flat_keep[i, k] = True
        rows = flat_keep[vpm]
        extra = {
            "visual_pos_masks": vpm_new,
            "deepstack_visual_embeds": [d[rows] for d in captured["deepstack_visual_embeds"]],
        }
    last = torch.stack([k[-1] for k in keeps])
    next_pos = pos[:, torch.arange(b), last] + 1
    return HandPruned(pe, pp, pm, keeps, extra, next_pos)


def oracle_logits(model, hp: HandPruned) -> torch.Tensor:
    """Unpatched language model + lm_head on the hand-pruned batch: [B, L', V]."""
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=hp.embeds,
            position_ids=hp.position_ids,
            attention_mask=hp.attention_mask,
            use_cache=False,
            **hp.extra,
        )
        return model.lm_head(out.last_hidden_state)


def oracle_greedy(model, hp: HandPruned, steps: int) -> torch.Tensor:
    """Greedy decoding by hand on the unpatched language model with the pruned cache: [B, steps]."""
    lm = model.model.language_model
    cache = DynamicCache(config=model.config.text_config)
    b = hp.embeds.shape[0]
    with torch.no_grad():
        out = lm(
            inputs_embeds=hp.embeds,
            position_ids=hp.position_ids,
            attention_mask=hp.attention_mask,
            past_key_values=cache,
            use_cache=True,
            **hp.extra,
        )
        tok = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        toks = [tok]
        mask = hp.attention_mask
        for step in range(1, steps):
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            pos = (hp.next_pos + step - 1)[:, :, None]
            out = lm(
                inputs_embeds=lm.embed_tokens(tok[:, None]),
                position_ids=pos,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
            tok = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
            toks.append(tok)
    return torch.stack(toks, dim=1)


def real_rows(logits: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the logits at its real positions, in order."""
    return [logits[i][mask[i].bool()] for i in range(logits.shape[0])]
