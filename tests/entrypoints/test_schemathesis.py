"""schemathesis over the server's own OpenAPI document: every operation, every check (the CLI's
`--checks all`), a bounded number of examples per operation, a fixed seed.

The server is the real app on the real default model, in process (schemathesis calls the ASGI app
directly; streamed responses are read whole), with an API key, so that the auth checks have
something to find. It must answer nothing with a 5xx and fail no check: whatever the document
allows is accepted, whatever it forbids is refused, and every response is documented.

A few rules cannot be stated in a static document; a refusal for one of them is dropped from the
failures only when the request really breaks that rule and the server's error says so
(BEYOND_THE_DOCUMENT, each with the reason). The run prints what it sent and what it found.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import load_all_checks
from schemathesis.engine import events, from_schema
from schemathesis.openapi.checks import RejectedPositiveData

from pagedllm.config import EngineArgs
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.entrypoints.openai.cli_args import ServerOptions
from pagedllm.entrypoints.openai.limits import RequestLimits
from pagedllm.entrypoints.openai.protocol import COMPLETIONS_MAX_TOKENS

API_KEY = "sk-schemathesis"
MODEL = "smol"
MAX_MODEL_LEN = 128  # the longest generation any request can ask for: keeps the run short
EXAMPLES = 40  # per operation, in the fuzzing phase (the coverage phase adds its own)
SEED = 20240607
# Small caps keep the work per request small; the document states them, so schemathesis keeps to
# them in what it means to be accepted and goes past them in what it means to be refused.
LIMITS = RequestLimits(max_n=2, max_prompts=2, max_stop=3, max_stop_chars=20,
                       max_stop_token_ids=4, max_bad_words=3, max_logit_bias=4,
                       max_allowed_token_ids=8, max_tokens_default=4)


# ---- what no static document can state ----------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A rule the server enforces that the OpenAPI document cannot state: a schema-valid request
    that breaks it is refused with a 400, which is right. `broken(body, message)` says whether
    this request breaks the rule and this error message is the server's for it."""

    why: str
    broken: Callable[[dict[str, Any], str], bool]


def asked_max_tokens(body: dict[str, Any]) -> int | None:
    """max_tokens as the server reads it: /v1/responses' max_output_tokens; chat's
    max_completion_tokens first; for /v1/completions OpenAI's default when absent (None: the
    server's own default)."""
    if "input" in body:  # /v1/responses
        return body.get("max_output_tokens")
    if "messages" in body:
        value = body.get("max_completion_tokens")
        return body.get("max_tokens") if value is None else value
    value = body.get("max_tokens", COMPLETIONS_MAX_TOKENS)
    return COMPLETIONS_MAX_TOKENS if value is None and body.get("use_beam_search") else value


def matches(pattern: str, message: str) -> re.Match | None:
    return re.search(pattern, message)


def prompt_and_output_too_long(body: dict[str, Any], message: str) -> bool:
    found = matches(r"the prompt \((\d+) tokens\) plus max_tokens \((\d+)\) is \d+ tokens, more "
                    r"than max_model_len \((\d+)\)", message)
    if not found:
        return False
    prompt, max_tokens, limit = map(int, found.groups())
    return max_tokens == asked_max_tokens(body) and prompt + max_tokens > limit


def prompt_too_many_tokens(body: dict[str, Any], message: str) -> bool:
    found = matches(r"the prompt is (\d+) tokens long, but max_model_len is (\d+)", message)
    text_prompt = "messages" in body or "input" in body or isinstance(body.get("prompt"), str) or (
        isinstance(body.get("prompt"), list) and isinstance(body["prompt"][0], str))
    return bool(found) and int(found[1]) >= int(found[2]) and text_prompt


def conversation_too_long(body: dict[str, Any], message: str) -> bool:
    return ("messages" in body or "input" in body) and bool(matches(
        r"the conversation is \d+ characters long", message))


def best_of_below_n(body: dict[str, Any], message: str) -> bool:
    found = matches(r"best_of \((\d+)\) must be at least n \((\d+)\)", message)
    return bool(found) and (body.get("best_of"), body.get("n", 1)) == (int(found[1]),
                                                                      int(found[2]))


def min_tokens_over_max_tokens(body: dict[str, Any], message: str) -> bool:
    found = matches(r"min_tokens \((\d+)\) must not exceed max_tokens \((\d+)\)", message)
    return bool(found) and (body.get("min_tokens"), asked_max_tokens(body)) == (
        int(found[1]), int(found[2]))


def greedy_with_several(body: dict[str, Any], message: str) -> bool:
    several = max(body.get("n", 1), body.get("best_of") or 1) > 1
    temperature = body.get("temperature")
    greedy = temperature is not None and temperature < 1e-5  # SamplingParams.greedy
    return "needs sampling" in message and several and greedy


STRUCTURED = ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
              "guided_grammar")


def structured_sources(body: dict[str, Any]) -> list[str]:
    sources = [name for name in STRUCTURED if body.get(name) is not None]
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") != "text":
        sources.append("response_format")
    return sources


def several_structured(body: dict[str, Any], message: str) -> bool:
    return "give one structured-output constraint, not several" in message and len(
        structured_sources(body)) > 1


def constraint_does_not_compile(body: dict[str, Any], message: str) -> bool:
    kind = matches(r"^invalid (JSON schema|regex|grammar) for structured outputs: ", message)
    not_json = matches(r"^structured_outputs\.json (is not valid JSON|must be a JSON schema)",
                       message)
    return bool(kind or not_json) and len(structured_sources(body)) == 1


def tool_names(body: dict[str, Any]) -> list[Any]:
    """The function names of a chat or Responses request's tools."""
    tools = body.get("tools") or []
    return [(t.get("function") or {}).get("name") if "function" in t else t.get("name")
            for t in tools if isinstance(t, dict)]


def forced_tool_choice(body: dict[str, Any]) -> bool:
    return body.get("tool_choice") == "required" or isinstance(body.get("tool_choice"), dict)


def tool_choice_without_its_tool(body: dict[str, Any], message: str) -> bool:
    """required or a named function without tools, or naming a function not among them."""
    if "needs tools" in message:
        return forced_tool_choice(body) and not tool_names(body)
    found = matches(r"tool_choice names function '(.*)', which is not among the tools", message)
    return bool(found) and found[1] not in tool_names(body)


def duplicate_tool_names(body: dict[str, Any], message: str) -> bool:
    names = tool_names(body)
    return "tools must have distinct function names" in message and len(set(names)) < len(names)


def auto_tool_choice_off(body: dict[str, Any], message: str) -> bool:
    """This server runs without --enable-auto-tool-choice: tools under 'auto' are refused."""
    return ("needs a server started with --enable-auto-tool-choice" in message
            and bool(tool_names(body)) and body.get("tool_choice") in (None, "auto"))


def forced_tool_and_structured(body: dict[str, Any], message: str) -> bool:
    text_format = ((body.get("text") or {}).get("format") or {}).get("type")
    structured = structured_sources(body) or text_format in ("json_object", "json_schema")
    return "is a structured-output constraint of its own" in message and forced_tool_choice(
        body) and bool(structured)


def request_template_fails(body: dict[str, Any], message: str) -> bool:
    return message.startswith("cannot apply the chat template") and bool(
        body.get("chat_template"))


BEYOND_THE_DOCUMENT = {
    "tool_choice names no given tool": Rule(
        "JSON Schema cannot say that one field's value is among another's",
        tool_choice_without_its_tool),
    "tools of one name": Rule("JSON Schema cannot say that items differ in one property",
                              duplicate_tool_names),
    "tool_choice auto without the server's parser": Rule(
        "a server option (--enable-auto-tool-choice), stated in tool_choice's description",
        auto_tool_choice_off),
    "forced tool call and structured output": Rule(
        "stated in tool_choice's description, as the other structured outputs are",
        forced_tool_and_structured),
    "responses input of reasoning items only": Rule(
        "JSON Schema could say it (contains), at the cost of a harder schema for the fuzzer",
        lambda body, message: message.startswith("input has no message") and all(
            isinstance(i, dict) and i.get("type") == "reasoning" for i in body["input"])),
    "the request's chat template cannot render it": Rule(
        "whether a Jinja template renders these messages is not a matter of JSON types",
        request_template_fails),
    "prompt + max_tokens over max_model_len": Rule(
        "the prompt's length in tokens depends on the tokenizer", prompt_and_output_too_long),
    "prompt over max_model_len tokens": Rule(
        "the document bounds a prompt's characters; its tokens depend on the tokenizer",
        prompt_too_many_tokens),
    "conversation too long": Rule(
        "the document bounds each message's characters; JSON Schema cannot bound their sum, "
        "let alone with the chat template's own text", conversation_too_long),
    "best_of < n": Rule("JSON Schema cannot compare two fields", best_of_below_n),
    "min_tokens > max_tokens": Rule("JSON Schema cannot compare two fields",
                                    min_tokens_over_max_tokens),
    # The next two JSON Schema can state, but as conditions on the whole request; each doubles
    # what schemathesis's schema engine multiplies out, and with them it gives up on the chat
    # request. The fields' descriptions in the document state them (protocol.py).
    "n > 1 without sampling": Rule("stated in the description of n and best_of",
                                   greedy_with_several),
    "several structured outputs": Rule("stated in the descriptions of the structured fields",
                                       several_structured),
    "constraint does not compile": Rule(
        "whether a regex, grammar or JSON schema compiles (in xgrammar's dialect) is not a "
        "matter of JSON types", constraint_does_not_compile),
}


def beyond_the_document(failure: Any, case: Any, response: Any) -> str | None:
    """The rule a rejected schema-valid request breaks, if it is one of BEYOND_THE_DOCUMENT."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
        return None
    if not isinstance(case.body, dict):
        return None
    message = json.loads(response.content)["error"]["message"]
    return next((name for name, rule in BEYOND_THE_DOCUMENT.items()
                 if rule.broken(case.body, message)), None)


def whole_floats_as_ints(value: Any) -> tuple[Any, int]:
    """JSON Schema counts 2.0 as an integer, and schemathesis writes about half the integers it
    draws so; this server reads integers strictly and refuses 2.0
    (test_server_units.py::test_wire_types_are_strict), a rule about how a number is written
    that no schema can state. Sent as 2, which JSON Schema holds equal, so that valid bodies are
    not refused for that alone. Returns the value and how many floats were rewritten."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value), 1
    if isinstance(value, dict):
        pairs = [(key, whole_floats_as_ints(item)) for key, item in value.items()]
        return {key: item for key, (item, _) in pairs}, sum(n for _, (_, n) in pairs)
    if isinstance(value, list):
        items = [whole_floats_as_ints(item) for item in value]
        return [item for item, _ in items], sum(n for _, n in items)
    return value, 0


# ---- the run ------------------------------------------------------------------------------------
class CountingApp:
    """The app, counting every response's status per path (schemathesis's own extra calls
    too)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.event_streams = 0  # streamed responses (text/event-stream)

    def by_status(self) -> dict[int, int]:
        counts = collections.Counter()
        for (_, status), n in self.statuses.items():
            counts[status] += n
        return dict(sorted(counts.items()))

    def by_path(self) -> dict[str, dict[int, int]]:
        paths: dict[str, dict[int, int]] = collections.defaultdict(dict)
        for (path, status), n in sorted(self.statuses.items()):
            paths[path][status] = n
        return dict(paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.statuses[scope.get("path"), message["status"]] += 1
                headers = dict(message.get("headers", []))
                self.event_streams += headers.get(b"content-type", b"").startswith(
                    b"text/event-stream")
            await send(message)

        await self.app(scope, receive, counting_send)


@dataclass
class Findings:
    operations: set[str] = field(default_factory=set)
    checks: collections.Counter = field(default_factory=collections.Counter)  # name -> runs
    failures: collections.Counter = field(default_factory=collections.Counter)  # (op, check, title)
    examples: dict = field(default_factory=dict)  # (op, check, title) -> (body, status, text)
    dropped: collections.Counter = field(default_factory=collections.Counter)  # rule -> count
    errors: list[str] = field(default_factory=list)  # schemathesis's: e.g. a schema it cannot use
    rewritten_floats: int = 0


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM.from_engine_args(EngineArgs(kv_cache_memory_bytes="256MiB",
                                                  max_model_len=MAX_MODEL_LEN))
    yield engine
    engine.shutdown()


def run_schemathesis(app: CountingApp) -> Findings:
    load_all_checks()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    # Nothing the server answers steers what is drawn next (its answers carry random ids, times
    # and samples): the run is the same every time, and the fuzzer cannot learn a rule from an
    # error message that the document should have stated.
    no_feedback = {"extra-data-sources": {"responses": False}}
    config = schemathesis.Config.from_dict({
        "seed": SEED, "headers": auth, "workers": 1, "continue-on-failure": True,
        "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"coverage": no_feedback,
                   "fuzzing": {**no_feedback, "error-feedback": {"enabled": False}}},
    })
    config.projects.override.checks.update(included_check_names=["all"])  # --checks all
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, headers=auth)
    found = Findings()

    @schema.hook
    def map_body(context, body):
        body, rewritten = whole_floats_as_ints(body)
        found.rewritten_floats += rewritten
        return body

    @schema.hook
    def filter_failure(context, failure, case, response) -> bool:
        rule = beyond_the_document(failure, case, response)
        if rule is not None:
            found.dropped[rule] += 1
        return rule is None

    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            record(found, event.recorder)
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            found.errors.append(str(getattr(event, "value", None) or event.exception)[:2000])
    return found


def record(found: Findings, recorder: Any) -> None:
    found.operations.add(recorder.label)
    for case_id, checks in recorder.checks.items():
        for check in checks:
            found.checks[check.name] += 1
            if check.failure_info is None:
                continue
            key = (recorder.label, check.name, check.failure_info.failure.title)
            found.failures[key] += 1
            interaction = recorder.interactions.get(case_id)
            response = interaction.response if interaction else None
            found.examples.setdefault(key, (
                recorder.cases[case_id].value.body,
                response.status_code if response else None,
                response.content[:500] if response else None))


def test_the_server_keeps_to_its_openapi_document(engine):
    app = CountingApp(build_app(engine, [MODEL], API_KEY, ServerOptions(limits=LIMITS)))
    start = time.monotonic()
    found = run_schemathesis(app)
    seconds = time.monotonic() - start
    statuses = app.by_status()
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    print(f"\nschemathesis: {len(found.operations)} operations, {sum(statuses.values())} "
          f"requests in {seconds:.0f} s; statuses {statuses}; {sum(found.checks.values())} "
          f"checks run, {sum(found.failures.values())} failed; {server_errors} responses >= 500")
    print(f"  by path: {app.by_path()}; {app.event_streams} of the 200s streamed")
    print(f"  checks run: {dict(found.checks)}")
    print(f"  refusals for rules beyond the document: {dict(found.dropped)}")
    print(f"  whole floats sent as integers: {found.rewritten_floats}")
    for key, count in found.failures.most_common():
        body, status, content = found.examples[key]
        print(f"  FAILED {count}x {key}: {status} {content!r}\n    body {str(body)[:1500]}")
    assert not found.errors, found.errors
    assert server_errors == 0
    assert not found.failures
    assert engine.is_running
