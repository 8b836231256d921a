"""all-MiniLM-L6-v2 through the engine: embeddings equal sentence-transformers', singly and in
mixed-length batches that the scheduler batches under its token budget; every pooling type
against transformers' hidden states; the blocks freed after; bad inputs refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llm
from pooling_helpers import TEXTS, assert_cosine_close, minilm_path, mixed_texts

from pagedllm import PoolingParams, SamplingParams, TokensPrompt


@pytest.fixture(scope="module")
def llm():
    # a small step budget, so that a batch of mixed lengths takes several steps
    return make_llm(model=str(minilm_path()), kv_cache_memory_bytes=32 << 20,
                    max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu")


@pytest.fixture(scope="module")
def hf_bert():
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path(), dtype=torch.float32).eval()


def embeddings(outputs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outputs])


def test_detected_as_a_mean_pooling_normalized_embedder(llm):
    config = llm.llm_engine.model_config
    assert config.runner == "pooling"
    assert (config.pooler_config.pooling_type, config.pooler_config.normalize) == ("MEAN", True)
    assert config.max_model_len == 256  # sentence_bert_config.json's max_seq_length


def test_each_text_alone_equals_sentence_transformers(llm, sentence_transformer):
    reference = sentence_transformer.encode(TEXTS)
    for text, expected in zip(TEXTS, reference):
        (output,) = llm.embed(text)
        assert_cosine_close([output.outputs.embedding], [expected])
        assert len(output.outputs.embedding) == 384


def test_a_mixed_length_batch_equals_sentence_transformers(llm, sentence_transformer):
    texts = TEXTS + mixed_texts(14)
    engine = llm.llm_engine
    steps_before = engine.num_steps
    outputs = llm.embed(texts)
    assert_cosine_close(embeddings(outputs), sentence_transformer.encode(texts))
    records = [r for r in engine.step_records if r.step >= steps_before]
    assert max(len(r.scheduled) for r in records) > 1  # batched together
    assert all(sum(r.scheduled.values()) <= 256 for r in records)  # within the token budget
    assert len(records) > 1  # and over several steps
    # no KV is kept after a pooling request
    stats = engine.kv_cache_stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_pooling_types_against_transformers_hidden_states(llm, hf_bert):
    text = TEXTS[2]
    ids = llm.get_tokenizer()(text, return_tensors="pt")
    with torch.inference_mode():
        hidden = hf_bert(**ids).last_hidden_state[0].numpy()
    expected = {"CLS": hidden[0], "MEAN": hidden.mean(0), "LAST": hidden[-1], "ALL": hidden}
    for kind, reference in expected.items():
        (output,) = llm.encode(text, PoolingParams(pooling_type=kind))
        assert np.allclose(output.outputs.data, reference, atol=1e-4), kind
    (raw,) = llm.embed(text, PoolingParams(normalize=False))
    assert np.allclose(raw.outputs.embedding, hidden.mean(0), atol=1e-4)


def test_token_id_input_equals_text_input(llm):
    ids = llm.get_tokenizer().encode(TEXTS[0])
    by_text, by_ids = llm.embed([TEXTS[0], TokensPrompt(prompt_token_ids=ids)])
    assert by_ids.prompt_token_ids == ids
    assert np.allclose(by_text.outputs.embedding, by_ids.outputs.embedding)


def test_score_of_an_embedder_is_the_cosine_similarity(llm, sentence_transformer):
    documents = ["a kitten sleeps", "stock markets fell", "cats are small felines"]
    outputs = llm.score("a cat", documents)
    vectors = sentence_transformer.encode(["a cat", *documents])
    expected = vectors[1:] @ vectors[0]
    assert np.allclose([o.outputs.score for o in outputs], expected, atol=1e-5)


@pytest.mark.parametrize(("call", "message"), [
    (lambda llm: llm.embed(""), "the prompt is empty"),
    (lambda llm: llm.embed(TokensPrompt(prompt_token_ids=[])), "the prompt is empty"),
    (lambda llm: llm.embed(TokensPrompt(prompt_token_ids=[101] * 257)),
     r"the input is 257 tokens long, more than this pooling model takes \(256 tokens: "
     "max_model_len"),
    (lambda llm: llm.embed("word " * 400), "tokens long, more than this pooling model"),
    (lambda llm: llm.embed("hi", PoolingParams(dimensions=128)), "Matryoshka"),
    (lambda llm: llm.classify("hi"), "does not support the 'classify' task"),
    (lambda llm: llm.generate("hi", SamplingParams(max_tokens=2)),
     "runs as a pooling model .* not text generation"),
    (lambda llm: llm.embed("hi", PoolingParams(pooling_type="MAX")), "pooling_type must be"),
])
def test_bad_input_is_a_value_error_and_the_engine_goes_on(llm, call, message):
    with pytest.raises(ValueError, match=message):
        call(llm)
    assert not llm.llm_engine.has_unfinished_requests()
    (output,) = llm.embed("still serving")
    assert len(output.outputs.embedding) == 384


def test_a_generative_engine_refuses_pooling_requests():
    llm = make_llm()  # the default model (SmolLM2), shared with other tests
    with pytest.raises(ValueError, match="runner='pooling'"):
        llm.embed("hi")
