"""Structured outputs through `pagedllm serve`: OpenAI's response_format (with the official
client and a pydantic model), vLLM's structured_outputs and guided_* fields, streaming,
concurrency, and 400s for bad constraints while the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Literal

import jsonschema
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field
from structured_output.schemas import SCHEMAS

from .server_utils import running_server

MODEL = "smol"
USER = [{"role": "user", "content": "Give an example answer."}]


class Pet(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=12)]
    species: Literal["cat", "dog", "parrot"]
    age: Annotated[int, Field(ge=0, le=30)]
    vaccinated: bool


class Owner(BaseModel):
    first_name: Annotated[str, Field(max_length=12)]
    pets: Annotated[list[Pet], Field(max_length=2)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve-structured"), "--served-model-name",
                        MODEL, "--kv-cache-memory", "256MiB", "--max-model-len", "1024",
                        "--disable-access-log") as server:
        yield server


def test_openai_client_parses_a_pydantic_response_format(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a pet owner."}],
        response_format=Owner, temperature=1.0, max_tokens=300, seed=4)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Owner)
    assert Owner.model_validate_json(message.content) == message.parsed


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_response_format_json_schema_and_json_object_on_both_routes(http, route):
    schema = SCHEMAS[0]
    text_field = {"messages": USER} if "chat" in route else {"prompt": "JSON:"}
    formats = [{"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                        "strict": True}},
               {"type": "json_object"}]
    for response_format in formats:
        body = {"model": MODEL, **text_field, "max_tokens": 120, "temperature": 0.8, "seed": 1,
                "response_format": response_format}
        response = http.post(route, json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        text = choice["message"]["content"] if "chat" in route else choice["text"]
        if choice["finish_reason"] == "length":  # an open-ended object may run long
            assert response_format["type"] == "json_object" and text.startswith("{")
            continue
        document = json.loads(text)
        assert isinstance(document, dict)
        if response_format["type"] == "json_schema":
            jsonschema.validate(document, schema)


def test_vllm_structured_outputs_and_guided_fields(client):
    digits, choices = r"[0-9]{3}-[0-9]{2}", ["red", "green", "blue"]
    grammar = 'root ::= "(" [a-z]{1,8} " " [0-9]{1,3} ")"'  # bounded: ends in time when hot
    cases = [
        ({"structured_outputs": {"regex": digits}}, lambda t: re.fullmatch(digits, t)),
        ({"structured_outputs": {"choice": choices}}, lambda t: t in choices),
        ({"structured_outputs": {"grammar": grammar}},
         lambda t: re.fullmatch(r"\([a-z]{1,8} [0-9]{1,3}\)", t)),
        ({"structured_outputs": {"json": SCHEMAS[10]}},
         lambda t: jsonschema.validate(json.loads(t), SCHEMAS[10]) is None),
        ({"guided_regex": digits}, lambda t: re.fullmatch(digits, t)),
        ({"guided_choice": choices}, lambda t: t in choices),
        ({"guided_grammar": grammar}, lambda t: re.fullmatch(r"\([a-z]{1,8} [0-9]{1,3}\)", t)),
        ({"guided_json": json.dumps(SCHEMAS[0])},
         lambda t: jsonschema.validate(json.loads(t), SCHEMAS[0]) is None),
    ]
    for extra, check in cases:
        chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=64,
                                              temperature=1.0, n=2, extra_body=extra)
        for choice in chat.choices:
            assert check(choice.message.content), (extra, choice.message.content)
        completion = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=64,
                                               temperature=1.0, extra_body=extra)
        assert check(completion.choices[0].text), (extra, completion.choices[0].text)


def test_streamed_chat_with_a_schema_adds_up_to_a_valid_document(client):
    schema = SCHEMAS[16]
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=200, temperature=1.0, seed=7, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "event",
                                                                 "schema": schema}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_concurrent_constrained_requests_all_validate(server):
    async def run() -> list[tuple[dict, str]]:
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=120) as aclient:
            async def one(i: int) -> tuple[dict, str]:
                schema = SCHEMAS[i % len(SCHEMAS)]
                reply = await aclient.chat.completions.create(
                    model=MODEL, messages=USER, max_tokens=200, temperature=1.0, seed=i,
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": f"s{i}", "schema": schema}})
                return schema, reply.choices[0].message.content
            return await asyncio.gather(*(one(i) for i in range(12)))

    for schema, text in asyncio.run(run()):
        jsonschema.validate(json.loads(text), schema)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     'Unsupported type "nope"'),
    ({"structured_outputs": {"regex": "(unclosed"}}, "invalid regex"),
    ({"guided_grammar": "root ::= missing_rule"}, 'Rule "missing_rule" is not defined'),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"structured_outputs": {"choice": []}}, "non-empty list"),
    ({"structured_outputs": {}}, "exactly one of"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "needs json_schema.schema"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "not several"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_constraints_are_400_with_the_reason_and_the_server_keeps_serving(http, extra,
                                                                              message):
    for route, text_field in (("/v1/chat/completions", {"messages": USER}),
                              ("/v1/completions", {"prompt": "x"})):
        response = http.post(route, json={"model": MODEL, **text_field, "max_tokens": 4,
                                          **extra})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert message in error["message"], error
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4,
                                            "guided_choice": ["fine"]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "fine"


def test_beam_search_with_a_constraint_is_refused(http):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "use_beam_search": True, "n": 2,
            "guided_choice": ["a", "b"]}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "use_beam_search"
    assert "structured outputs" in response.json()["error"]["message"]
