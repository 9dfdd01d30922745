"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL with visual-token pruning, as vLLM model and processor
subclasses.

Imported by vLLM (never by ``import tokenprune_kernels``) when an architecture of
:data:`tokenprune_kernels.vllm.ARCHITECTURES` is selected through ``hf_overrides``.

How a request flows (vLLM 0.32)
-------------------------------
1. Processor (API process). Each pruned item's (image; video for Qwen2/2.5-VL) placeholder run
   is ``k = clamp(floor(r * n + 0.5), 1, n)`` tokens instead of ``n``, so the scheduler sizes
   the KV cache (and chunks the prompt) for the pruned prompt from the start. Each such item's
   multimodal hash is re-keyed with the whole prompt and every item hash of the request: the
   selection depends on the question and on the prompt's layout, so vLLM's processor cache,
   encoder cache and prefix cache never hand one prompt's selection to another. A prompt whose
   last token is visual (no instruction after it) is refused.
2. ``get_mrope_input_positions`` (worker, when the request is added). The unpruned prompt is
   rebuilt (``n`` tokens per image) and vLLM's own M-RoPE rule (the parent class) gives its
   position ids; text keeps exactly those (text after an image keeps the unpruned ids), and
   ``mrope_position_delta`` makes decoded tokens continue from the unpruned prompt's maximum.
   For each image the "context" of its scoring is attached to its multimodal item
   (``tokenprune_ctx``: token ids, unpruned t/h/w ids and role of every row the image's
   instruction queries see: every text token of the prompt and this image's own tokens, in
   prompt order; other images' tokens are left out, see below).
3. ``embed_multimodal`` (worker, per encoder batch). The vision tower runs as usual; then every
   image of the batch is scored at once (varlen) by :func:`scoring.score_and_select` from the
   model's OWN layer-0 modules (``input_layernorm``, ``qkv_proj``, Qwen3's ``q_norm`` /
   ``k_norm``, ``rotary_emb``; vLLM may repack weights, so they are called, never read) and the
   ops; the kept rows are returned (Qwen3-VL: with their deepstack channels),
   with their original t/h/w ids appended as extra channels (:func:`scoring.encode_positions`).
   The encoder cache stores that, so chunked prefill and cache hits get the same rows.
4. ``embed_input_ids`` strips the channels; ``forward`` writes the carried ids into the
   positions of the visual rows of this step. Nothing of vLLM's runner is patched: this works
   where vLLM's own pruning hook (``recompute_mrope_positions``) is never enabled (the CPU
   runner).

Videos (Qwen2-VL, Qwen2.5-VL) are pruned like images, all frames as one sequence; Qwen3-VL's
videos (timestamp text between frames) pass through unpruned. Several images / videos in a
prompt: each is scored and pruned on its own (its own ``k``, since the KV size is fixed per
item in step 1) with the prompt's instruction (the text after the last visual token, less
``<|vision_start|>`` / ``<|vision_end|>``: the transformers integration's rule) as queries;
its keys are the prompt's text and its own tokens (other items may be encoded in other steps).
For a single item this is exactly what the transformers integration computes.
Not supported (clear error at startup): tensor or pipeline parallelism (the per-head scores
would need an all-reduce across ranks).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem, PlaceholderRange
from vllm.multimodal.processing.processor import PromptReplacement

import tokenprune_kernels as tp
from tokenprune_kernels.transformers.prune import packed_instruction_mask
from tokenprune_kernels.transformers.qwen import SPEC as QWEN_SPEC
from tokenprune_kernels.vllm import VllmPruneSettings, settings_from_config
from tokenprune_kernels.vllm.scoring import (
    FLAG_KEEP,
    FLAG_SET,
    FLAG_UNSCORED,
    Layer0Fns,
    PackedPrompts,
    decode_positions,
    encode_positions,
    position_channels,
    score_and_select,
)

CTX_KEY = "tokenprune_ctx"
ROLE_TEXT, ROLE_VISUAL, ROLE_INSTRUCTION = 0, 1, 2
HISTORY = 64  # last selections, for inspection: ``model.tokenprune_history`` (tests read it)


# --------------------------------------------------------------------------------------------
# Processor (API process)
# --------------------------------------------------------------------------------------------


class _PruneProcessorMixin:
    """Shrinks each pruned item's placeholder run to its kept count and re-keys its hash."""

    tokenprune_modalities: tuple[str, ...] = ("image", "video")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokenprune_settings()  # bad settings fail here, at startup, in the API process

    def _tokenprune_settings(self) -> VllmPruneSettings:
        return settings_from_config(self.info.get_hf_config())

    def _get_prompt_updates(
        self,
        mm_items: Any,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: Any,
    ) -> Sequence[Any]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = self._tokenprune_settings()
        out = []
        for update in updates:
            if update.modality in self.tokenprune_modalities:
                full = update.replacement

                def kept(item_idx: int, full: Any = full) -> list[int]:
                    tokens = full(item_idx) if callable(full) else full
                    return list(tokens)[: settings.kept_count(len(tokens))]

                update = PromptReplacement(
                    modality=update.modality, target=update.target, replacement=kept
                )
            out.append(update)
        return out

    def _get_mm_hashes(self, inputs: Any) -> dict[str, list[str]]:
        hashes = super()._get_mm_hashes(inputs)
        h = hashlib.sha256()
        h.update(np.asarray(inputs.prompt, dtype=np.int64).tobytes())
        for modality in sorted(hashes):
            for item_hash in hashes[modality]:
                h.update(f"|{modality}:{item_hash}".encode())
        prompt_key = h.hexdigest()
        return {
            m: [
                hashlib.sha256(f"tokenprune|{x}|{prompt_key}".encode()).hexdigest()
                if m in self.tokenprune_modalities
                else x
                for x in items
            ]
            for m, items in hashes.items()
        }

    def get_dummy_mm_inputs(self, *args: Any, **kwargs: Any) -> Any:
        # vLLM's profiling / warm-up prompt is only the placeholders: never a request.
        self._tokenprune_dummy = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            self._tokenprune_dummy = False

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        out = super().apply(inputs, timing_ctx)
        if getattr(self, "_tokenprune_dummy", False):
            return out
        ids = torch.tensor(out["prompt_token_ids"], dtype=torch.int64)
        visual = torch.zeros(ids.numel(), dtype=torch.bool)
        for ranges in out["mm_placeholders"].values():
            for r in ranges:
                visual[r.offset : r.offset + r.length] = True
        pruned = any(out["mm_placeholders"].get(m) for m in self.tokenprune_modalities)
        if pruned and not bool(_instruction_rows(ids, visual, self.info.get_hf_config()).any()):
            raise ValueError(
                "tokenprune: the prompt has no text after its last image or video (other than "
                "<|vision_end|>); pruning ranks the visual tokens by the attention of that text "
                "(the question), so the prompt needs some"
            )
        return out


class TokenPruneQwen2VLMultiModalProcessor(_PruneProcessorMixin, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor with pruned image and video placeholder runs."""


class TokenPruneQwen2_5_VLMultiModalProcessor(_PruneProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with pruned image and video placeholder runs."""


class TokenPruneQwen3VLMultiModalProcessor(_PruneProcessorMixin, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's processor with pruned image placeholder runs (videos: timestamps between
    frames, not pruned yet)."""

    tokenprune_modalities = ("image",)


# --------------------------------------------------------------------------------------------
# Model (worker)
# --------------------------------------------------------------------------------------------


def _instruction_rows(ids: torch.Tensor, visual: torch.Tensor, config: Any) -> torch.Tensor:
    """The family's instruction rule (the one the transformers integration uses): the tokens
    after the last visual token, except the structural ``<|vision_start|>`` / ``<|vision_end|>``.
    ``ids``, ``visual``: ``[L]`` of one prompt. Returns ``[L]`` bool."""
    structural = torch.isin(ids, torch.tensor(QWEN_SPEC.structural_token_ids(config)))
    return packed_instruction_mask(visual, torch.tensor([0, ids.numel()]), structural)


def _grid(feature: Any) -> list[int]:
    return [int(v) for v in feature.data[f"{feature.modality}_grid_thw"].data.tolist()]


class _PruneModelMixin:
    """Pruning for a vLLM Qwen VL model class (see the module docstring)."""

    tokenprune_modalities: tuple[str, ...] = ("image", "video")

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune = settings_from_config(self.config)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ValueError(
                "tokenprune: tensor / pipeline parallel serving is not supported yet (the "
                "layer-0 scores would need an all-reduce over the ranks' heads); got "
                f"tensor_parallel_size={parallel.tensor_parallel_size}, "
                f"pipeline_parallel_size={parallel.pipeline_parallel_size}"
            )
        if getattr(self, "is_multimodal_pruning_enabled", False):
            raise ValueError(
                "tokenprune: vLLM's own video pruning (EVS, video_pruning_rate) is on; its "
                "carried positions clash with ours: leave video_pruning_rate unset"
            )
        mapper = None
        if self.tokenprune.mapper is not None:
            from tokenprune_kernels.mapper import load_mapper

            mapper = load_mapper(self.tokenprune.mapper)
        # not a submodule: vLLM's loader expects every parameter of the model in the checkpoint
        object.__setattr__(self, "_tokenprune_mapper", mapper)
        self._tokenprune_pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.tokenprune_history: deque[dict[str, torch.Tensor]] = deque(maxlen=HISTORY)

    # -- encoder CUDA graphs would skip embed_multimodal ----------------------------------------

    def get_encoder_cudagraph_config(self) -> Any:
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[]) if config is not None else None

    # -- positions ------------------------------------------------------------------------------

    def _merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        merge = self._merge_size()
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        full: list[int] = []
        src: list[np.ndarray] = []  # full-prompt row of each pruned-prompt row
        spans = []  # (feature, full offset, n)
        full_features = []
        st = 0
        for f in features:
            off, k = f.mm_position.offset, f.mm_position.length
            src.append(np.arange(st, off) + len(full) - st)
            full += input_tokens[st:off]
            n = k
            if f.modality in self.tokenprune_modalities:
                t, h, w = _grid(f)
                n = t * h * w // merge**2
                if k != self.tokenprune.kept_count(n):
                    raise RuntimeError(
                        f"tokenprune: an image of {n} tokens has {k} placeholders, expected "
                        f"{self.tokenprune.kept_count(n)} (was the prompt processed by the "
                        "tokenprune processor?)"
                    )
            src.append(len(full) + np.arange(k))  # placeholder ids; forward sets kept ones
            spans.append((f, len(full), n))
            full_features.append(
                dataclasses.replace(f, mm_position=PlaceholderRange(offset=len(full), length=n))
            )
            full += input_tokens[off : off + k] if n == k else [input_tokens[off]] * n
            st = off + k
        src.append(np.arange(st, len(input_tokens)) + len(full) - st)
        full += input_tokens[st:]
        positions, delta = super().get_mrope_input_positions(full, full_features)
        index = torch.from_numpy(np.concatenate(src).astype(np.int64))
        pruned = positions[:, index]
        delta = int(delta) + len(full) - len(input_tokens)
        self._attach_contexts(full, positions, spans)
        return pruned, delta

    def _attach_contexts(self, full: list[int], positions: torch.Tensor, spans: list) -> None:
        """Store, in each image's multimodal item, the rows its instruction queries see."""
        if not spans:
            return
        visual = torch.zeros(len(full), dtype=torch.bool)
        for _, off, n in spans:
            visual[off : off + n] = True
        ids = torch.tensor(full, dtype=torch.int64)
        instruction = _instruction_rows(ids, visual, self.config)
        if not bool(instruction.any()):
            raise ValueError(
                "tokenprune: the prompt has no instruction after its last visual token"
            )
        role = torch.full((len(full),), ROLE_TEXT, dtype=torch.int64)
        role[instruction] = ROLE_INSTRUCTION
        for f, off, n in spans:
            if f.modality not in self.tokenprune_modalities or f.data is None:
                continue
            rows = ~visual
            rows[off : off + n] = True
            r = role.clone()
            r[off : off + n] = ROLE_VISUAL
            ctx = torch.cat([ids[None], positions.to(torch.int64), r[None]])[:, rows]
            f.data[CTX_KEY] = MultiModalFieldElem(data=ctx, field=MultiModalBatchedField())

    # -- scoring --------------------------------------------------------------------------------

    def _layer0(self) -> Layer0Fns:
        """The first decoder layer's modules, called as the model calls them."""
        layer = self.language_model.model.layers[0]
        attn = layer.self_attn

        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)

        def qk(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            qkv, _ = attn.qkv_proj(h)
            q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            if q_norm is not None:  # Qwen3: per-head RMSNorm before rotary
                q = q_norm(q.reshape(-1, attn.num_heads, attn.head_dim)).reshape(q.shape)
                k = k_norm(k.reshape(-1, attn.num_kv_heads, attn.head_dim)).reshape(k.shape)
            return q, k

        return Layer0Fns(
            norm=layer.input_layernorm,
            qk=qk,
            rotary=attn.rotary_emb,
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            softmax_scale=attn.scaling,
        )

    def _prune_items(
        self, features: list[torch.Tensor], contexts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        if len(features) != len(contexts):
            raise RuntimeError(f"tokenprune: {len(features)} images but {len(contexts)} contexts")
        embed = self.language_model.embed_input_ids
        hidden = int(self.config.text_config.hidden_size)  # Qwen3-VL: deepstack channels follow
        rows, pos, vis_pos = [], [], []
        lengths, n_q, n_v = [], [], []
        q_rows, v_rows = [], []
        start = 0
        for feat, ctx in zip(features, contexts, strict=True):
            ctx = ctx.to(device=feat.device)
            role = ctx[4]
            x = embed(ctx[0]).to(feat.dtype)
            vis = role == ROLE_VISUAL
            if int(vis.sum()) != feat.shape[0]:
                raise RuntimeError(
                    f"tokenprune: an image has {feat.shape[0]} features but its context "
                    f"{int(vis.sum())} visual rows"
                )
            x[vis] = feat[:, :hidden]
            rows.append(x)
            pos.append(ctx[1:4])
            vis_pos.append(ctx[1:4][:, vis])
            q_rows.append((role == ROLE_INSTRUCTION).nonzero().flatten() + start)
            v_rows.append(vis.nonzero().flatten() + start)
            lengths.append(ctx.shape[1])
            n_q.append(q_rows[-1].numel())
            n_v.append(feat.shape[0])
            start += ctx.shape[1]
        device = features[0].device

        def cu(counts: list[int]) -> torch.Tensor:
            return torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int64, device=device)

        packed = PackedPrompts(
            embeds=torch.cat(rows),
            positions=torch.cat(pos, dim=1),
            cu_seqlens=cu(lengths),
            query_rows=torch.cat(q_rows),
            cu_seqlens_q=cu(n_q),
            visual_rows=torch.cat(v_rows),
            cu_seqlens_v=cu(n_v),
        )
        scores, kept_idx, cu_kept = score_and_select(
            self._layer0(),
            packed,
            keep_ratio=self.tokenprune.keep_ratio,
            mapper=self._tokenprune_mapper,
            spread_radius=self.tokenprune.spread_radius,
        )
        kept_embeds, kept_pos = tp.gather_kept(
            torch.cat(features), torch.cat(vis_pos, dim=1), kept_idx
        )
        out = []
        cu_v = packed.cu_seqlens_v.tolist()
        bounds = cu_kept.tolist()
        for i in range(len(features)):
            a, b = bounds[i], bounds[i + 1]
            out.append(encode_positions(kept_embeds[a:b], kept_pos[:, a:b], FLAG_SET))
            self.tokenprune_history.append(  # device tensors: no extra synchronisation
                {"kept": kept_idx[a:b] - cu_v[i], "scores": scores[cu_v[i] : cu_v[i + 1]]}
            )
        return tuple(out)

    def embed_multimodal(self, **kwargs: object) -> Any:
        contexts = kwargs.pop(CTX_KEY, None)
        outputs = super().embed_multimodal(**kwargs)
        if not outputs:
            return outputs
        video = "pixel_values_videos" in kwargs or "video_embeds" in kwargs
        if ("video" if video else "image") not in self.tokenprune_modalities:
            return tuple(encode_positions(e, None, FLAG_KEEP) for e in outputs)
        if contexts is None:  # vLLM's profiling run: dummy items never added as requests
            return tuple(encode_positions(e, None, FLAG_UNSCORED) for e in outputs)
        if isinstance(contexts, torch.Tensor):
            contexts = list(contexts.unbind(0))
        return self._prune_items(list(outputs), list(contexts))

    # -- merge and positions of the step --------------------------------------------------------

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: Any = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._tokenprune_pending = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(
                input_ids, multimodal_embeddings, is_multimodal=is_multimodal
            )
        width = multimodal_embeddings[0].shape[-1] - position_channels(3)
        embeds, flags, positions = [], [], []
        for carried in multimodal_embeddings:
            e, f, p = decode_positions(carried, width, 3)
            embeds.append(e)
            flags.append(f)
            positions.append(p)
        flag = torch.cat(flags)
        if bool((flag == FLAG_UNSCORED).any()):
            raise RuntimeError(
                "tokenprune: image features reached the language model unpruned (no prompt "
                "context was attached when the request was added)"
            )
        self._tokenprune_pending = (is_multimodal, torch.cat(positions, dim=1), flag == FLAG_SET)
        return super().embed_input_ids(input_ids, embeds, is_multimodal=is_multimodal)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> Any:
        pending, self._tokenprune_pending = self._tokenprune_pending, None
        if pending is not None and inputs_embeds is not None:
            is_mm, carried, set_rows = pending
            rows = is_mm.to(positions.device).nonzero().flatten()
            if rows.numel() != carried.shape[1]:
                raise RuntimeError(
                    f"tokenprune: {rows.numel()} multimodal rows in this step but "
                    f"{carried.shape[1]} carried position ids"
                )
            set_rows = set_rows.to(positions.device)
            positions[:, rows[set_rows]] = carried.to(positions)[:, set_rows]
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class TokenPruneQwen2VLForConditionalGeneration(_PruneModelMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with pruned image and video tokens (settings: ``hf_config.tokenprune``)."""


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokenPruneQwen2_5_VLForConditionalGeneration(
    _PruneModelMixin, Qwen2_5_VLForConditionalGeneration
):
    """vLLM's Qwen2.5-VL with pruned image and video tokens (``hf_config.tokenprune``)."""


@MULTIMODAL_REGISTRY.register_processor(
    TokenPruneQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class TokenPruneQwen3VLForConditionalGeneration(_PruneModelMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with pruned image tokens; the deepstack features of the kept tokens go
    with them (they are channels of the same encoder output). Videos pass through."""

    tokenprune_modalities = ("image",)


__all__ = [
    "TokenPruneQwen2VLForConditionalGeneration",
    "TokenPruneQwen2VLMultiModalProcessor",
    "TokenPruneQwen2_5_VLForConditionalGeneration",
    "TokenPruneQwen2_5_VLMultiModalProcessor",
    "TokenPruneQwen3VLForConditionalGeneration",
    "TokenPruneQwen3VLMultiModalProcessor",
]
