"""Tiny in-process LLaVA / LLaVA-OneVision models, their inputs, and the independent oracle.

Nothing here imports ``tokenprune_kernels.transformers``: the oracle runs the UNPATCHED model with
eager attention and ``output_attentions=True`` to read the layer-0 attention rows, scores and
selects with ``tokenprune_kernels.reference`` / ``mapper_forward_ref``, builds the pruned sequence
by hand and runs the unpatched language model + lm_head on it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.modeling_llava_onevision import (
    image_size_to_num_patches,
)

from tokenprune_kernels.mapper import mapper_forward_ref
from tokenprune_kernels.reference import select_topk_ref
from tokenprune_kernels.testing import oracle_keep_counts
from tokenprune_kernels.validation import KeepRule

IMAGE_ID = 100
VIDEO_ID = 101
PAD_ID = 0
VOCAB = 160
TEXT_IDS = (3, 99)  # ordinary text tokens are drawn from [3, 99)
LLAVA_IMAGE = 20  # CLIP image side; patch 4 -> 25 visual tokens per image (CLS dropped)
OV_TILE = 16  # SigLIP tile side; patch 4 -> 4x4 tokens per tile
OV_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32], [48, 16]]

FAMILIES = ("llava", "llava_onevision")


def _text_kwargs() -> dict:
    # A wider init than the default 0.02 so that layer-0 attention is far from flat (no near-ties
    # at the top-k threshold; the oracle asserts the gap).
    return dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        initializer_range=0.25,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
    )


def build_model(family: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny random ``*ForConditionalGeneration`` of ``family`` in fp32 eval mode (no hub)."""
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    if family == "llava":
        vision = CLIPVisionConfig(**tower, image_size=LLAVA_IMAGE, patch_size=4, projection_dim=32)
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**_text_kwargs()),
            image_token_id=IMAGE_ID,
            attn_implementation=attn,
        )
        model = LlavaForConditionalGeneration(config)
    elif family == "llava_onevision":
        vision = SiglipVisionConfig(**tower, image_size=OV_TILE, patch_size=4)
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=Qwen2Config(**_text_kwargs()),
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            image_grid_pinpoints=OV_PINPOINTS,
            attn_implementation=attn,
        )
        model = LlavaOnevisionForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown family {family!r}")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


@dataclass
class Sample:
    """One prompt: a list of segments ``("text", n)``, ``("image", (h, w))`` or ``("video", f)``."""

    segments: list = field(default_factory=list)


def _image_tokens(model, size: tuple[int, int], pixels: torch.Tensor) -> int:
    """Visual tokens the model itself produces for one image (its own feature path)."""
    with torch.no_grad():
        if model.config.model_type == "llava":
            return (LLAVA_IMAGE // 4) ** 2
        feats = model.model.get_image_features(
            pixels[None], torch.tensor([size]), return_dict=True
        ).pooler_output
        return int(feats[0].shape[0])


def build_inputs(
    model, samples: list[Sample], gen: torch.Generator, padding_side: str = "left"
) -> dict:
    """Token ids, attention mask and pixel tensors for ``samples`` (batch = len(samples))."""
    family = model.config.model_type
    rows, images, sizes, videos = [], [], [], []
    for sample in samples:
        ids: list[int] = []
        for kind, arg in sample.segments:
            if kind == "text":
                ids += torch.randint(*TEXT_IDS, (arg,), generator=gen).tolist()
            elif kind == "image":
                if family == "llava":
                    pix = torch.randn(3, LLAVA_IMAGE, LLAVA_IMAGE, generator=gen)
                else:
                    n = image_size_to_num_patches(arg, OV_PINPOINTS, OV_TILE)
                    pix = torch.randn(n, 3, OV_TILE, OV_TILE, generator=gen)
                images.append(pix)
                sizes.append(list(arg or (LLAVA_IMAGE, LLAVA_IMAGE)))
                ids += [IMAGE_ID] * _image_tokens(model, tuple(sizes[-1]), pix)
            elif kind == "video":
                videos.append(torch.randn(arg, 3, OV_TILE, OV_TILE, generator=gen))
                ids += [VIDEO_ID] * (arg * ((OV_TILE // 4 + 1) // 2) ** 2 + 1)
            else:
                raise ValueError(kind)
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, ids in enumerate(rows):
        sl = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        mask[b, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if images:
        if family == "llava":
            out["pixel_values"] = torch.stack(images)
        else:
            most = max(p.shape[0] for p in images)
            pv = torch.zeros(len(images), most, 3, OV_TILE, OV_TILE)
            for i, p in enumerate(images):
                pv[i, : p.shape[0]] = p
            out["pixel_values"] = pv
            out["image_sizes"] = torch.tensor(sizes)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out


def generate_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate()`` derives from a 2-D mask (cumsum - 1, pads at 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@dataclass
class OracleResult:
    logits: list[torch.Tensor]  # per sample: [n_b', V] logits at the real pruned positions
    kept: list[torch.Tensor]  # per sample: original positions of the kept visual tokens
    tokens: torch.Tensor | None  # [B, n] greedy tokens (when asked)
    loss: torch.Tensor | None  # causal LM loss on the pruned labels (when asked)


def _assert_no_near_tie(scores: torch.Tensor, k: int) -> None:
    if 0 < k < scores.numel():
        s = torch.sort(scores.double(), descending=True).values
        gap = float(s[k - 1] - s[k])
        assert gap > 1e-4 * float(s[k - 1].abs()) + 1e-9, (
            f"near-tie at the top-k threshold (gap {gap:.3g}): pick another seed or config"
        )


def oracle(
    model,
    inputs: dict,
    *,
    keep_ratio: float | None = None,
    keep_count: int | None = None,
    mapper=None,
    instruction_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    new_tokens: int = 0,
    labels: torch.Tensor | None = None,
    keep_mass: float | None = None,
    min_keep_ratio: float = 0.0,
    max_keep_ratio: float = 1.0,
) -> OracleResult:
    """The pruned model's outputs, computed independently from an UNPATCHED ``model`` (the
    adaptive rule's counts by :func:`~tokenprune_kernels.testing.oracle_keep_counts`)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    lm = ref.model.language_model
    seen: dict = {}
    hook = lm.register_forward_pre_hook(
        lambda _m, _a, kw: seen.update(kw) if "embeds" not in seen else None, with_kwargs=True
    )
    kw = dict(inputs)
    if position_ids is not None:
        kw["position_ids"] = position_ids
    with torch.no_grad():
        out = ref(**kw, output_attentions=True, use_cache=False)
    hook.remove()
    seen["embeds"] = True
    embeds = seen["inputs_embeds"]
    batch, length, _ = embeds.shape
    attn0 = out.attentions[0].double()  # [B, Hq, L, L], softmax over the visible keys
    ids = inputs["input_ids"]
    visual = (ids == IMAGE_ID) | (ids == VIDEO_ID)
    real = inputs["attention_mask"].bool()
    pos = seen.get("position_ids")
    pos = torch.arange(length).expand(batch, length) if pos is None else pos.expand(batch, -1)
    if instruction_mask is None:
        idx = torch.arange(length).expand(batch, length)
        last_visual = torch.where(visual, idx, -1).amax(dim=1, keepdim=True)
        instruction_mask = real & (idx > last_visual) & visual.any(1, keepdim=True)
    scores, cu = [], [0]
    for b in range(batch):
        rows = attn0[b][:, instruction_mask[b]][:, :, visual[b]]
        scores.append(rows.mean(dim=(0, 1)).float())
        cu.append(cu[-1] + int(visual[b].sum()))
    cu_v = torch.tensor(cu)
    packed = torch.cat(scores)
    if mapper is not None:
        packed = mapper_forward_ref(
            packed, cu_v, mapper.op_params(), mapper.config.kernel_size, mapper.config.input_eps
        )
    rule = KeepRule(keep_ratio, keep_count, keep_mass, min_keep_ratio, max_keep_ratio)
    counts = oracle_keep_counts(packed, cu_v, rule, softmax=mapper is not None)
    kept_idx, _ = select_topk_ref(packed, cu_v, counts)
    keep = real & ~visual
    kept_pos = []
    for b in range(batch):
        _assert_no_near_tie(packed[cu[b] : cu[b + 1]], int(counts[b]))
        local = kept_idx[(kept_idx >= cu[b]) & (kept_idx < cu[b + 1])] - cu[b]
        vis_pos = torch.nonzero(visual[b]).flatten()[local]
        keep[b, vis_pos] = True
        kept_pos.append(vis_pos)
    # Re-pad the pruned rows on the input's padding side (left when any row starts with a pad).
    left = bool((~real[:, 0]).any())
    lengths = keep.sum(1)
    width = int(lengths.max())
    new_e = embeds.new_zeros(batch, width, embeds.shape[-1])
    new_p = torch.zeros(batch, width, dtype=torch.long)
    new_m = torch.zeros(batch, width, dtype=torch.long)
    new_l = torch.full((batch, width), -100, dtype=torch.long)
    for b in range(batch):
        src = torch.nonzero(keep[b]).flatten()
        n = src.numel()
        sl = slice(width - n, width) if left else slice(0, n)
        new_e[b, sl] = embeds[b, src]
        new_p[b, sl] = pos[b, src]
        new_m[b, sl] = 1
        if labels is not None:
            new_l[b, sl] = labels[b, src]
    with torch.no_grad():
        cache = DynamicCache(config=ref.config.text_config)
        step = functools.partial(lm, past_key_values=cache, use_cache=True)  # fills the cache
        h = step(inputs_embeds=new_e, attention_mask=new_m, position_ids=new_p).last_hidden_state
        logits = ref.lm_head(h)
        per_sample = [logits[b][new_m[b].bool()] for b in range(batch)]
        loss = None
        if labels is not None:
            loss = ref.loss_function(
                logits=logits, labels=new_l, vocab_size=ref.config.text_config.vocab_size
            )
        tokens = None
        if new_tokens:
            assert left or batch == 1 or bool(real.all()), "greedy oracle needs left padding"
            step_logits = logits[:, -1]
            next_pos = new_p[:, -1:] + 1
            mask = new_m
            got = []
            for t in range(new_tokens):
                top2 = torch.topk(step_logits, 2, dim=-1).values
                assert bool((top2[:, 0] - top2[:, 1] > 1e-4).all()), "near-tie in greedy decode"
                tok = step_logits.argmax(-1)
                got.append(tok)
                if t + 1 == new_tokens:
                    break
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                tok_e = lm.embed_tokens(tok[:, None])
                h = step(inputs_embeds=tok_e, attention_mask=mask, position_ids=next_pos)
                h = h.last_hidden_state
                next_pos = next_pos + 1
                step_logits = ref.lm_head(h[:, -1])
            tokens = torch.stack(got, dim=1)
    return OracleResult(logits=per_sample, kept=kept_pos, tokens=tokens, loss=loss)


def unpatched_logits(model, inputs: dict) -> list[torch.Tensor]:
    """Per-sample real-position logits of the model as it is (call before patching)."""
    with torch.no_grad():
        logits = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    return [logits[b][mask[b]] for b in range(logits.shape[0])]
