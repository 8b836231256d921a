"""`pagedllm serve --enable-lora` through the official openai client: adapters from
--lora-modules (both forms), /v1/models with their parent, model=<adapter> on completions and
chat, loading and unloading at run time behind the API key, and the errors (OpenAI-style)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
from lora_models import ALL, ATTENTION, TINY, peft_reference, save_adapter
from openai import NotFoundError, OpenAI
from tiny_models import save_tiny_model, transformers_greedy
from transformers import LlamaConfig

from pagedllm import LLM, SamplingParams
from pagedllm.lora.request import LoRARequest
from pagedllm.model.source import resolve_model_source
from pagedllm.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from entrypoints.server_utils import launch_server  # noqa: E402

API_KEY = "sk-lora"
BASE_NAME = "tiny-base"
PROMPT = "San Francisco is a"
MAX_TOKENS = 6
MAX_RANK = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama with the default model's tokenizer (so text goes in and out), adapters a1
    (rank 8), a2 (rank 4, rslora), a3 (loaded at run time) and a rank-16 one (too big)."""
    root = tmp_path_factory.mktemp("lora-serve")
    tokenizer = load_tokenizer(resolve_model_source(None))
    config = LlamaConfig(**(TINY | {"vocab_size": len(tokenizer)}), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    save_tiny_model(config, root / "base")
    tokenizer.save_pretrained(root / "base")
    for name, rank, targets, seed, rslora in (("a1", 8, ALL, 1, False),
                                              ("a2", 4, ATTENTION, 2, True),
                                              ("a3", 8, ALL, 3, False),
                                              ("big", 16, ATTENTION, 4, False)):
        save_adapter(root / "base", root / name, rank, 16, targets, seed, rslora)
    return root


@pytest.fixture(scope="module")
def server(folders):
    a2 = json.dumps({"name": "a2", "path": str(folders / "a2"), "base_model_name": BASE_NAME})
    server = launch_server(
        folders, str(folders / "base"), "--served-model-name", BASE_NAME, "--dtype", "float32",
        "--kv-cache-memory", "64MiB", "--enable-lora", "--max-loras", "2", "--max-lora-rank",
        str(MAX_RANK), "--lora-modules", f"a1={folders / 'a1'}", a2,
        "--allow-runtime-lora-updating", "--disable-access-log", api_key=API_KEY)
    try:
        server.wait_until_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(folders):
    """The same engine offline: its adapters' tokens are checked against peft here too."""
    return LLM(str(folders / "base"), dtype="float32", kv_cache_memory_bytes=64 << 20,
               enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK)


def lora_of(folders, name: str, lora_id: int) -> LoRARequest:
    return LoRARequest(name, lora_id, str(folders / name))


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def complete(client: OpenAI, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                     temperature=0, extra_body={"ignore_eos": True}
                                     ).choices[0].text


def test_models_lists_each_adapter_with_its_parent(client, folders):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE_NAME, "a1", "a2"}
    assert cards["a1"].parent == BASE_NAME and cards["a2"].parent == BASE_NAME
    assert cards["a1"].root == str(folders / "a1")
    assert getattr(cards[BASE_NAME], "parent", None) is None


def test_model_selects_the_adapter_on_completions(client, offline, folders):
    texts = {model: complete(client, model) for model in (BASE_NAME, "a1", "a2")}
    assert len(set(texts.values())) == 3
    tokenizer = offline.get_tokenizer()
    prompt_ids = tokenizer.encode(PROMPT)
    for model, lora_id in (("a1", 1), ("a2", 2), (BASE_NAME, 0)):
        lora = lora_of(folders, model, lora_id) if lora_id else None
        output = offline.generate([PROMPT], greedy(), use_tqdm=False, lora_request=lora)[0]
        assert texts[model] == output.outputs[0].text
        reference = peft_reference(folders / "base", folders / model if lora_id else None)
        assert output.outputs[0].token_ids == transformers_greedy(reference, prompt_ids,
                                                                  MAX_TOKENS)


def test_model_selects_the_adapter_on_chat(client, offline, folders):
    messages = [{"role": "user", "content": "Name a color."}]
    for model, lora_id in (("a1", 1), (BASE_NAME, 0)):
        reply = client.chat.completions.create(model=model, messages=messages,
                                               max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body={"ignore_eos": True})
        lora = lora_of(folders, model, lora_id) if lora_id else None
        expected = offline.chat(messages, greedy(), use_tqdm=False, lora_request=lora)
        assert reply.choices[0].message.content == expected[0].outputs[0].text


def test_load_and_unload_at_run_time(client, server, folders):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"lora_name": "a3", "lora_path": str(folders / "a3")}
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 401  # no key
        auth = {"Authorization": f"Bearer {API_KEY}"}
        loaded = http.post("/v1/load_lora_adapter", json=body, headers=auth)
        assert loaded.status_code == 200, loaded.text
        assert "a3" in {m.id for m in client.models.list().data}
        assert complete(client, "a3") not in (complete(client, BASE_NAME), complete(client, "a1"))
        again = http.post("/v1/load_lora_adapter", json=body, headers=auth)
        assert error_of(again, 400, "already been loaded")
        unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "a3"}, headers=auth)
        assert unloaded.status_code == 200, unloaded.text
        with pytest.raises(NotFoundError):
            complete(client, "a3")
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "a3"}, headers=auth)
        assert error_of(gone, 404, "cannot be found")


@pytest.mark.parametrize("name, path, problem", [
    ("nowhere", "/no/such/adapter", "does not exist"),
    ("not-adapter", None, "not a PEFT adapter"),
    ("big", "big", f"above max_lora_rank \\({MAX_RANK}\\)"),
])
def test_bad_adapters_are_a_400_naming_the_problem(server, client, folders, name, path,
                                                    problem):
    path = str(folders / "base") if path is None else str(folders / path) if path == "big" else path
    with httpx.Client(base_url=server.url, timeout=60, headers={
            "Authorization": f"Bearer {API_KEY}"}) as http:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    assert error_of(response, 400, problem)
    assert name not in {m.id for m in client.models.list().data}
    assert complete(client, "a1")  # still serving


def error_of(response: httpx.Response, status: int, match: str) -> bool:
    import re

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return re.search(match, error["message"]) is not None


def test_runtime_updating_is_off_by_default(monkeypatch):
    """Without --allow-runtime-lora-updating (or its env variable) the routes do not exist."""
    from entrypoints.test_server_units import FakeEngine
    from fastapi.testclient import TestClient

    from pagedllm.entrypoints.openai.api_server import build_app
    from pagedllm.entrypoints.openai.cli_args import RUNTIME_LORA_ENV, runtime_lora_allowed

    monkeypatch.delenv(RUNTIME_LORA_ENV, raising=False)
    assert not runtime_lora_allowed(False)
    client = TestClient(build_app(FakeEngine(), ["fake"]))
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert response.status_code == 404 and "error" in response.json()
    monkeypatch.setenv(RUNTIME_LORA_ENV, "1")
    assert runtime_lora_allowed(False)


@pytest.mark.parametrize("text, expected", [
    ("sql=/a/b", ("sql", "/a/b", None)),
    ('{"name": "chat", "path": "/c", "base_model_name": "m"}', ("chat", "/c", "m")),
])
def test_lora_modules_forms(text, expected):
    from pagedllm.entrypoints.openai.cli_args import parse_lora_module

    module = parse_lora_module(text)
    assert (module.name, module.path, module.base_model_name) == expected


@pytest.mark.parametrize("text", ["no-equals", "=/path", '{"name": "x"}', '{"name": 1}', "{bad"])
def test_bad_lora_modules_are_refused(text):
    import argparse

    from pagedllm.entrypoints.openai.cli_args import parse_lora_module

    with pytest.raises(argparse.ArgumentTypeError, match="--lora-modules"):
        parse_lora_module(text)


def test_metrics_carry_lora_requests_info(server):
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        text = http.get("/metrics").text
    assert 'pagedllm:lora_requests_info{max_lora="2"' in text
