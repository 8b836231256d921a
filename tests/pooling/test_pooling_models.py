"""Tiny random pooling models against transformers: a BERT cross-encoder's scores and a BERT
classifier's probabilities (token types included), a decoder as a last-token embedder, and a
decoder's *ForSequenceClassification head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llm
from pooling_helpers import assert_cosine_close, tiny_bert_classifier, tiny_llama_config

from pagedllm import PoolingParams, TokensPrompt

PAIRS = [("what is a cat", "a cat is a small domesticated feline"),
         ("what is a cat", "stock markets fell sharply on tuesday"),
         ("capital of italy", "rome"),
         ("how do paged caches work", "blocks of keys and values are allocated on demand and "
          "shared between sequences that have the same prefix")]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert-cross-encoder")
    model = tiny_bert_classifier(folder, num_labels=1)
    return model, make_llm(model=str(folder), kv_cache_memory_bytes=8 << 20)


def transformers_scores(model, tokenizer, pairs) -> np.ndarray:
    batch = tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True,
                      return_tensors="pt")
    with torch.inference_mode():
        return torch.sigmoid(model(**batch).logits[:, 0]).numpy()


def test_cross_encoder_scores_equal_transformers(cross_encoder):
    model, llm = cross_encoder
    assert llm.llm_engine.model_config.pooling_tasks == ("classify", "encode", "score")
    outputs = llm.score(PAIRS[0][0], [d for q, d in PAIRS if q == PAIRS[0][0]])
    outputs += llm.score([q for q, _ in PAIRS], [d for _, d in PAIRS])
    ours = [o.outputs.score for o in outputs]
    expected = transformers_scores(model, llm.get_tokenizer(), PAIRS[:2] + PAIRS)
    assert np.allclose(ours, expected, atol=1e-5)
    # the second text's segment matters: the same ids with every token type 0 score otherwise
    ids = outputs[2].prompt_token_ids
    (flat,) = llm.encode(TokensPrompt(prompt_token_ids=ids), pooling_task="score")
    assert abs(flat.outputs.score - ours[2]) > 1e-6


def test_bert_classifier_probabilities_equal_transformers(tmp_path):
    model = tiny_bert_classifier(tmp_path, num_labels=3)
    llm = make_llm(model=str(tmp_path), kv_cache_memory_bytes=8 << 20)
    texts = ["a cat", "the stock market fell sharply on tuesday afternoon", "rome"]
    outputs = llm.classify(texts)
    batch = llm.get_tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.softmax(model(**batch).logits, dim=-1).numpy()
    assert np.allclose([o.outputs.probs for o in outputs], expected, atol=1e-5)
    assert outputs[0].outputs.num_classes == 3
    with pytest.raises(ValueError, match="cannot score"):
        llm.score("a", "b")  # three labels: a classifier, not a cross-encoder


def test_decoder_as_last_token_embedder_equals_transformers(tmp_path):
    from transformers import LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(tiny_llama_config()).eval()
    model.save_pretrained(tmp_path)  # bare decoder names, as Qwen3-Embedding ships them
    # a 16-token step budget: the longer prompts run in chunks (last-token pooling of a causal
    # model allows it), their earlier chunks only filling the paged KV cache
    llm = make_llm(model=str(tmp_path), runner="pooling", skip_tokenizer_init=True,
                   kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=16)
    config = llm.llm_engine.model_config
    assert (config.pooler_config.pooling_type, config.pooling_tasks) == ("LAST",
                                                                          ("embed", "encode",
                                                                           "score"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 5, 17, 40, 3, 60)]
    engine = llm.llm_engine
    steps_before = engine.num_steps
    outputs = llm.embed([TokensPrompt(prompt_token_ids=p) for p in prompts])
    with torch.inference_mode():
        expected = [model(torch.tensor([p])).last_hidden_state[0, -1].numpy() for p in prompts]
    assert_cosine_close([o.outputs.embedding for o in outputs], expected)
    assert all(abs(np.linalg.norm(o.outputs.embedding) - 1) < 1e-5 for o in outputs)
    steps_of = {}
    for record in engine.step_records:
        if record.step >= steps_before:
            for request_id in record.scheduled:
                steps_of[request_id] = steps_of.get(request_id, 0) + 1
    assert steps_of[outputs[5].request_id] >= 4  # 60 tokens in chunks of at most 16
    stats = engine.kv_cache_stats()
    assert stats.num_free_blocks == stats.num_blocks
    # mean pooling needs every token's row in one step: over the budget it is refused
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        llm.encode(TokensPrompt(prompt_token_ids=prompts[5]), PoolingParams(pooling_type="MEAN"))
    (short,) = llm.encode(TokensPrompt(prompt_token_ids=prompts[1]),
                          PoolingParams(pooling_type="MEAN"))
    with torch.inference_mode():
        hidden = model(torch.tensor([prompts[1]])).last_hidden_state[0]
    assert np.allclose(short.outputs.data, hidden.mean(0).numpy(), atol=1e-4)


def test_decoder_sequence_classifier_equals_transformers(tmp_path):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = tiny_llama_config(num_labels=4, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    llm = make_llm(model=str(tmp_path), skip_tokenizer_init=True,
                   kv_cache_memory_bytes=8 << 20)
    assert llm.llm_engine.model_config.runner == "pooling"  # detected from the architecture
    prompts = [[5, 9, 200, 31], [7], list(range(1, 30))]
    outputs = llm.classify([TokensPrompt(prompt_token_ids=p) for p in prompts])
    with torch.inference_mode():
        expected = [torch.softmax(model(torch.tensor([p])).logits[0], -1).numpy()
                    for p in prompts]
    assert np.allclose([o.outputs.probs for o in outputs], expected, atol=1e-5)


def test_encoder_answers_the_decoders_call_as_whole_sequences(cross_encoder):
    """The GPU memory plan profiles a step through model(ids, positions, caches, metadata):
    an encoder runs it as whole sequences (decodes alone, each prefill chunk whole)."""
    from conftest import worker_of

    from pagedllm.attention import AttentionMetadata, PrefillChunk

    _, llm = cross_encoder
    model = worker_of(llm).model
    ids = torch.tensor([101, 101, 2054, 2003, 1037, 102, 101, 7592, 102])
    positions = torch.tensor([0, 0, 1, 2, 3, 4, 0, 1, 2])
    empty = torch.zeros(0, dtype=torch.long)
    metadata = AttentionMetadata(empty, 1, empty.view(1, 0), torch.tensor([1]),
                                 [PrefillChunk(1, 5, 5, empty), PrefillChunk(6, 3, 3, empty)], 16)
    with torch.inference_mode():
        hidden = model(ids, positions, None, metadata)
        encoded = model.encode(ids, positions, torch.zeros_like(ids), [1, 5, 3])
        alone = model.encode(ids[1:6], positions[1:6], torch.zeros(5, dtype=torch.long), [5])
    torch.testing.assert_close(hidden, encoded)
    torch.testing.assert_close(hidden[1:6], alone, atol=1e-5, rtol=1e-5)
    assert model.compute_logits(hidden) is None
