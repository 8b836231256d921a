"""Logprobs against transformers' float32 log-softmax on the same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llm, worker_of

from pagedllm import SamplingParams
from pagedllm.worker import model_runner

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Colors of the rainbow:"]


def hf_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row i: distribution of token i + 1


@pytest.mark.parametrize("chunk,logits_slice", [(None, None), (8, None), (None, 2)])
def test_sample_and_prompt_logprobs_match_transformers(llm, hf_model, chunk, logits_slice,
                                                       monkeypatch):
    engine_llm = llm if chunk is None else make_llm(max_num_batched_tokens=chunk)
    if logits_slice is not None:  # a prompt's logits computed a few positions at a time
        worker_of(engine_llm)
        monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_SLICE", logits_slice)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=3)
    for output in engine_llm.generate(PROMPTS, params, use_tqdm=False):
        completion = output.outputs[0]
        full = output.prompt_token_ids + completion.token_ids
        reference = hf_logprobs(hf_model, full)
        prompt_len = len(output.prompt_token_ids)

        assert output.prompt_logprobs[0] is None
        assert len(output.prompt_logprobs) == prompt_len
        for i in range(1, prompt_len):
            entry = output.prompt_logprobs[i]
            target = output.prompt_token_ids[i]
            assert entry[target].logprob == pytest.approx(reference[i - 1, target].item(), abs=1e-3)
            top = torch.topk(reference[i - 1], 3)
            assert set(top.indices.tolist()) <= set(entry)
            rank = int((reference[i - 1] > reference[i - 1, target]).sum()) + 1
            assert entry[target].rank == rank

        for j, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = reference[prompt_len - 1 + j]
            assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-3)
            values, ids = torch.topk(row, 5)
            for value, token_id in zip(values.tolist(), ids.tolist()):
                assert entry[token_id].logprob == pytest.approx(value, abs=1e-3)
            assert entry[token_id].decoded_token == llm.get_tokenizer().decode([token_id])


def test_prompt_logprobs_skip_the_prefix_cache(llm):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    prompt = "A long enough prompt to fill more than one block of sixteen tokens, surely " * 2
    first, second = (llm.generate(prompt, params, use_tqdm=False)[0] for _ in range(2))
    assert second.num_cached_tokens == 0
    assert len(second.prompt_logprobs) == len(second.prompt_token_ids)
    assert [None if e is None else sorted(e) for e in first.prompt_logprobs] == \
        [None if e is None else sorted(e) for e in second.prompt_logprobs]
