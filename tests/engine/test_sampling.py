"""Sampling options and stop conditions, end to end on the bundled model."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import make_llm

from pagedllm import SamplingParams, TokensPrompt

PROMPT = "Once upon a time"


def run(llm, prompt=PROMPT, **kwargs):
    (output,) = llm.generate(prompt, SamplingParams(**kwargs), use_tqdm=False)
    return output.outputs[0]


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm):
    a = run(llm, temperature=1.0, seed=123, max_tokens=24)
    b = run(llm, temperature=1.0, seed=123, max_tokens=24)
    c = run(llm, temperature=1.0, seed=321, max_tokens=24)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_seeded_request_is_independent_of_the_batch(llm):
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=20)
    (alone,) = llm.generate(PROMPT, params, use_tqdm=False)
    others = [SamplingParams(temperature=1.0, max_tokens=4 + n) for n in range(16)]
    batch = llm.generate([f"Story {i}:" for i in range(len(others))] + [PROMPT],
                         others + [params], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_top_k_one_is_greedy(llm):
    greedy = run(llm, temperature=0, max_tokens=16)
    top1 = run(llm, temperature=1.5, top_k=1, max_tokens=16, seed=1)
    assert top1.token_ids == greedy.token_ids


def test_tiny_top_p_is_greedy(llm):
    greedy = run(llm, temperature=0, max_tokens=16)
    nucleus = run(llm, temperature=1.0, top_p=1e-6, max_tokens=16, seed=3)
    assert nucleus.token_ids == greedy.token_ids


def test_temperature_sampling_varies(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8)
    outputs = llm.generate([PROMPT] * 6, params, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 1


def test_max_tokens_and_length_finish(llm):
    out = run(llm, temperature=0, max_tokens=5, ignore_eos=True)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def say_hi_chat_prompt(tokenizer) -> TokensPrompt:
    """A chat turn the model answers briefly and ends with EOS."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                         tokenize=False, add_generation_prompt=True)
    return TokensPrompt(prompt_token_ids=tokenizer.encode(chat, add_special_tokens=False))


def test_eos_stops_unless_ignored(llm):
    tokenizer = llm.get_tokenizer()
    prompt = say_hi_chat_prompt(tokenizer)
    out = run(llm, prompt, temperature=0, max_tokens=200)
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token not in out.text
    ignored = run(llm, prompt, temperature=0, max_tokens=len(out.token_ids) + 5, ignore_eos=True)
    assert ignored.finish_reason == "length"
    assert ignored.token_ids[: len(out.token_ids)] == out.token_ids


def test_min_tokens_holds_back_eos(llm):
    tokenizer = llm.get_tokenizer()
    prompt = say_hi_chat_prompt(tokenizer)
    natural = run(llm, prompt, temperature=0, max_tokens=200)
    longer = run(llm, prompt, temperature=0, max_tokens=200, min_tokens=len(natural.token_ids) + 3)
    assert len(longer.token_ids) >= len(natural.token_ids) + 3
    assert tokenizer.eos_token_id not in longer.token_ids[: len(natural.token_ids) + 2]


def test_stop_token_ids(llm):
    greedy = run(llm, temperature=0, max_tokens=20, ignore_eos=True)
    target = greedy.token_ids[4]
    out = run(llm, temperature=0, max_tokens=20, stop_token_ids=[target])
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(target) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_stop_string_is_cut_from_the_text(llm):
    greedy = run(llm, "The capital of France is", temperature=0, max_tokens=20)
    assert "The answer" in greedy.text
    out = run(llm, "The capital of France is", temperature=0, max_tokens=20, stop="answer")
    assert out.text == greedy.text[: greedy.text.index("answer")]
    assert out.finish_reason == "stop" and out.stop_reason == "answer"
    kept = run(llm, "The capital of France is", temperature=0, max_tokens=20, stop=["answer"],
               include_stop_str_in_output=True)
    assert kept.text.endswith("answer")


def test_utf8_never_breaks_mid_character(llm):
    prompt = "Write the words for 'hello' in Chinese, Japanese, Korean and Russian:"
    outputs = llm.generate([prompt] * 3, SamplingParams(temperature=1.0, max_tokens=48, seed=5),
                           use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for output in outputs:
        completion = output.outputs[0]
        expected = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.text == expected


def test_sampled_logprobs_are_returned(llm):
    out = run(llm, temperature=0, max_tokens=6, logprobs=3)
    assert len(out.logprobs) == len(out.token_ids)
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert token_id in entry and entry[token_id].rank == 1  # greedy picks rank 1
        assert len(entry) == 3
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_token_id_prompts_match_text_prompts(llm):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(PROMPT)
    by_text = run(llm, temperature=0, max_tokens=10)
    by_ids = run(llm, {"prompt_token_ids": ids}, temperature=0, max_tokens=10)
    assert by_ids.token_ids == by_text.token_ids


def test_engine_without_tokenizer_runs_on_token_ids(llm):
    bare = make_llm(skip_tokenizer_init=True)
    assert bare.get_tokenizer() is None
    ids = llm.get_tokenizer().encode(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=10, detokenize=False)
    (out,) = bare.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)
    assert out.outputs[0].token_ids == run(llm, temperature=0, max_tokens=10).token_ids
    assert out.outputs[0].text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        bare.generate("text needs a tokenizer", params, use_tqdm=False)


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(expected, "keys"):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert out.prompt_token_ids == list(expected)
    assert "Paris" in out.outputs[0].text
    several = llm.chat([messages, messages], SamplingParams(temperature=0, max_tokens=5),
                       use_tqdm=False)
    assert len(several) == 2


def test_distribution_of_first_token_follows_temperature(llm):
    # With a high temperature, more distinct first tokens appear than with a low one.
    def distinct(temperature):
        params = SamplingParams(temperature=temperature, max_tokens=1, seed=None)
        outs = llm.generate(["My favourite animal is the"] * 24, params, use_tqdm=False)
        return len(Counter(o.outputs[0].token_ids[0] for o in outs))

    assert distinct(2.0) > distinct(0.05)
