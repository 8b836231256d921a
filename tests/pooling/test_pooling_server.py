"""The pooling routes of a real `pagedllm serve`: OpenAI's client and LangChain's
OpenAIEmbeddings against sentence-transformers on all-MiniLM-L6-v2 (float and base64,
Matryoshka dimensions, token-id inputs), /rerank and /score on a tiny cross-encoder against
transformers, and the 400s across the generate/pooling divide."""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pooling_helpers import TEXTS, assert_cosine_close, minilm_path, tiny_bert_classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from entrypoints.server_utils import running_server  # noqa: E402
from entrypoints.test_server_units import FakeEngine  # noqa: E402

MATRYOSHKA = [128, 384]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    flags = ["--kv-cache-memory", "32MiB", "--dtype", "float32", "--no-engine-core-process",
             "--pooler-config", f'{{"matryoshka_dimensions": {MATRYOSHKA}}}']
    with running_server(tmp_path_factory.mktemp("embedder-logs"), str(minilm_path()),
                        *flags) as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    return model, model.encode(TEXTS)


@pytest.fixture(scope="module")
def client(embedder):
    from openai import OpenAI

    return OpenAI(base_url=embedder.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_float_embeddings(client, reference):
    result = client.embeddings.create(model=str(minilm_path()), input=TEXTS)
    assert [d.index for d in result.data] == list(range(len(TEXTS)))
    assert_cosine_close([d.embedding for d in result.data], reference[1])
    tokenizer_counts = [len(reference[0].tokenizer(t)["input_ids"]) for t in TEXTS]
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(tokenizer_counts)


def test_openai_client_base64_and_dimensions(client, reference):
    floats = client.embeddings.create(model=str(minilm_path()), input=TEXTS[:2],
                                      encoding_format="float", dimensions=128)
    # the openai client decodes base64 itself only when it asked for it by default; ask the
    # raw response so that the wire format is the one checked
    raw = client.embeddings.with_raw_response.create(
        model=str(minilm_path()), input=TEXTS[:2], encoding_format="base64", dimensions=128)
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
               for d in raw.http_response.json()["data"]]
    assert np.allclose(decoded, [d.embedding for d in floats.data], atol=1e-7)
    full = reference[1][:2]
    truncated = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    assert_cosine_close(decoded, truncated)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in decoded)


def test_token_id_inputs(client, reference):
    tokenizer = reference[0].tokenizer
    ids = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    one = client.embeddings.create(model=str(minilm_path()), input=ids[0])
    many = client.embeddings.create(model=str(minilm_path()), input=ids)
    assert_cosine_close([one.data[0].embedding], reference[1][:1])
    assert_cosine_close([d.embedding for d in many.data], reference[1][:3])


def test_langchain_openai_embeddings(embedder, reference):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=str(minilm_path()), base_url=embedder.url + "/v1",
                                  api_key="unused", check_embedding_ctx_length=False)
    assert_cosine_close(embeddings.embed_documents(TEXTS), reference[1])
    assert_cosine_close([embeddings.embed_query(TEXTS[0])], reference[1][:1])


def test_score_and_rerank_of_an_embedder_use_cosine_similarity(embedder, reference):
    documents = TEXTS[1:4]
    body = {"query": TEXTS[0], "documents": documents, "top_n": 2}
    response = httpx.post(embedder.url + "/v1/rerank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    expected = reference[1][1:4] @ reference[1][0]
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected)[:2])
    assert np.allclose([r["relevance_score"] for r in results], np.sort(expected)[::-1][:2],
                       atol=1e-5)


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/v1/embeddings", {"input": ""}, "empty"),
    ("/v1/embeddings", {"input": []}, "input is empty"),
    ("/v1/embeddings", {"input": "word " * 400}, "tokens long, more than this pooling model"),
    ("/v1/embeddings", {"input": [[101] * 300]}, "300 tokens long"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 100}, r"dimensions must be one of"),
    ("/v1/embeddings", {"input": [[10**9]]}, "token ids must be integers in"),
    ("/classify", {"input": "hi"}, "does not support the 'classify' task"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, "pooling model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
     "pooling model"),
])
def test_bad_requests_are_400s_saying_why(embedder, path, body, message):
    response = httpx.post(embedder.url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]["message"])
    assert httpx.get(embedder.url + "/health").status_code == 200


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    """The tiny cross-encoder's app in this process (no second server process to start)."""
    from fastapi.testclient import TestClient

    from pagedllm.config import EngineArgs
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import build_app

    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    model = tiny_bert_classifier(folder, num_labels=1)
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(folder), dtype="float32",
                                                  kv_cache_memory_bytes="8MiB"))
    try:
        with TestClient(build_app(engine, ["tiny-cross-encoder"])) as http:
            yield http, model
    finally:
        engine.shutdown()


def test_rerank_ordering_equals_the_cross_encoders_scores(cross_encoder):
    http, model = cross_encoder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    query = "what is a cat"
    documents = ["a cat is a small feline", "stocks fell", "cats purr", "rome is in italy",
                 "the paged cache holds keys and values in blocks"]
    batch = tokenizer([query] * len(documents), documents, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.sigmoid(model(**batch).logits[:, 0]).numpy()
    for path in ("/rerank", "/v1/rerank"):
        response = http.post(path, json={"query": query, "documents": documents})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["index"] for r in results] == list(np.argsort(-expected))
        assert np.allclose([r["relevance_score"] for r in results], np.sort(expected)[::-1],
                           atol=1e-5)
        assert results[0]["document"]["text"] == documents[results[0]["index"]]
    response = http.post("/score", json={"text_1": query, "text_2": documents})
    assert np.allclose([d["score"] for d in response.json()["data"]], expected, atol=1e-5)
    embed = http.post("/v1/embeddings", json={"input": "hi"})
    assert embed.status_code == 400 and "'embed' task" in embed.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/pooling", "/score", "/rerank",
                                  "/v1/rerank", "/classify"])
def test_a_generative_server_answers_pooling_routes_with_a_400(path):
    from fastapi.testclient import TestClient

    from pagedllm.entrypoints.openai.api_server import build_app

    app = build_app(FakeEngine(), ["generator"])
    response = TestClient(app).post(path, json={"input": "hi"})
    assert response.status_code == 400
    assert "--runner pooling" in response.json()["error"]["message"]
    assert path not in app.openapi()["paths"]  # not offered in its document
