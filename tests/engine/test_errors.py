"""Bad input gets a ValueError that names the problem, and the engine keeps working."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"temperature": -0.5}, "temperature must be non-negative"),
    ({"top_k": -2}, "top_k"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": [""]}, "stop strings"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number"),
    ({"top_p": float("nan")}, "top_p must be a finite number"),
    ({"logit_bias": {1: float("nan")}}, r"logit_bias values must be in \[-100, 100\]"),
    ({"logit_bias": {1: 101}}, r"logit_bias values must be in \[-100, 100\]"),
    ({"seed": 2**64}, "seed must fit in 64 bits"),
    ({"stop": ["ok", "\ud800"]}, r"stop\[1\] must be valid UTF-8"),
    ({"bad_words": ["\udfff"]}, r"bad_words\[0\] must be valid UTF-8"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)


def test_prompt_longer_than_max_model_len(llm):
    limit = llm.llm_engine.model_config.max_model_len
    with pytest.raises(ValueError, match=f"max_model_len is {limit}"):
        llm.generate({"prompt_token_ids": [1] * (limit + 5)}, use_tqdm=False)


def test_prompt_plus_max_tokens_too_long(llm):
    limit = llm.llm_engine.model_config.max_model_len
    with pytest.raises(ValueError, match="more than max_model_len"):
        llm.generate({"prompt_token_ids": [1] * 10}, SamplingParams(max_tokens=limit),
                     use_tqdm=False)


def test_request_larger_than_the_whole_cache():
    from conftest import make_llm

    small = make_llm(kv_cache_memory_bytes=20 * 737280)  # 320 tokens in all
    with pytest.raises(ValueError, match="whole KV cache"):
        small.generate({"prompt_token_ids": [1] * 300}, SamplingParams(max_tokens=50),
                       use_tqdm=False)


def test_token_ids_out_of_vocabulary(llm):
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.generate({"prompt_token_ids": [1, 10**9]}, use_tqdm=False)


def test_one_bad_prompt_leaves_nothing_queued(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    (ok,) = llm.generate("still serving", SamplingParams(max_tokens=3), use_tqdm=False)
    assert ok.finished


def test_mismatched_params_list(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_model_path_that_does_not_exist():
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/no/such/model/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))


def test_bad_engine_args():
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="int3")
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=0)
