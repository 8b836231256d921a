"""Request and response bodies of the OpenAI API, as pydantic models.

Request models accept unknown fields (clients send newer OpenAI fields all the time) and each
knows how to become `SamplingParams`. Fields the engine cannot honour yet are listed by
`unsupported()` so that the server can answer 400 instead of quietly ignoring them.

Requests are read strictly: "true" is not a boolean and "2" not an integer (pydantic's lax mode
would coerce both). Every string anywhere in a body must be valid Unicode (JSON's "\\ud800"
escape can carry a lone surrogate, which no tokenizer takes) and a body may nest at most
MAX_JSON_DEPTH levels deep (a deeper JSON schema would exhaust the stack when copied).

The OpenAPI document states what each request may hold (`rule`, `either`, below): the rules the
handlers check, with messages of their own. tests/entrypoints/test_schemathesis.py holds the
server to it both ways: what the document allows is accepted, what it forbids is refused.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedllm.engine.beam_ranking import MAX_LENGTH_PENALTY
from pagedllm.entrypoints.openai.limits import LIMIT_KEY
from pagedllm.sampling_params import (
    SEED_RANGE,
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
    check_text,
)

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs; the sampler's top-k cost grows with it
MAX_JSON_DEPTH = 64  # nesting of a request body (a JSON schema's, mostly)
# vLLM's request extras this server does not implement: a 400 naming the field, rather than
# being ignored. Unknown fields otherwise pass (OpenAI adds fields; user, metadata, store and
# the like change nothing about the output).
UNSUPPORTED_VLLM_EXTRAS = {  # field -> the values that ask for nothing (vLLM's defaults)
    **dict.fromkeys(("guided_decoding_backend", "guided_whitespace_pattern", "documents",
                     "mm_processor_kwargs", "media_io_kwargs", "truncate_prompt_tokens",
                     "prompt_logprobs", "logits_processors", "kv_transfer_params",
                     "vllm_xargs", "thinking_token_budget", "request_id",
                     # OpenAI's, for its reasoning models; no template here reads it
                     "reasoning_effort"), (None,)),
    **dict.fromkeys(("return_tokens_as_token_ids", "return_token_ids"), (None, False)),
    "spaces_between_special_tokens": (None, True),
}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---- what the OpenAPI document states -----------------------------------------------------------
# Handlers check each rule with a message that names the field (and tests read those messages),
# so most rules are stated in the document only, through json_schema_extra: `rule(...)` for one
# field, `either(...)` for one field's value that constrains another. A value the server learns when
# it starts (a --max-* cap, the vocabulary, max_model_len) is written `Limit(name)`;
# limits.document_limits fills it in.
TOKEN_ID_KEY = re.compile("[0-9]+")  # a logit_bias key: a token id in ASCII digits

# keyword -> the JSON types it constrains: on a union (`anyOf`) it goes on those branches only
_KEYWORD_TYPES = {
    **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
                    ("integer", "number")),
    **dict.fromkeys(("minLength", "maxLength", "enum"), ("string",)),
    **dict.fromkeys(("minItems", "maxItems", "items"), ("array",)),
    **dict.fromkeys(("maxProperties", "propertyNames", "additionalProperties"), ("object",)),
    "const": ("boolean",),
}


@dataclass(frozen=True)
class Limit:
    """A value known when the server starts: a RequestLimits field or a model bound (limits.py).
    The schema holds `{LIMIT_KEY: {keyword: name}}` until document_limits writes the value."""

    name: str


def rule(**keywords: Any) -> Callable[[dict[str, Any]], None]:
    """json_schema_extra: put JSON-schema keywords on a field's schema, on the union branches of
    the types they constrain (`maxItems` on the array branch of `str | list[str] | None`)."""

    def extra(schema: dict[str, Any]) -> None:
        branches = schema.get("anyOf", [schema])
        for keyword, value in keywords.items():
            targets = [b for b in branches if b.get("type") in _KEYWORD_TYPES[keyword]]
            if not targets:
                raise TypeError(f"{keyword} constrains none of the types of {schema}")
            for branch in targets:
                if isinstance(value, Limit):
                    branch.setdefault(LIMIT_KEY, {})[keyword] = value.name
                else:  # a copy: document_limits fills in the schema in place
                    branch[keyword] = copy.deepcopy(value)

    return extra


def given(name: str, *types: str) -> dict[str, Any]:
    """The field is present and not null (one of these JSON types)."""
    return {"required": [name], "properties": {name: {"type": list(types)}}}


def is_true(name: str) -> dict[str, Any]:
    return {"required": [name], "properties": {name: {"const": True}}}


def is_false(name: str) -> dict[str, Any]:
    """False, or absent (a boolean field whose default is false)."""
    return {"properties": {name: {"const": False}}}


def either(*schemas: dict[str, Any]) -> dict[str, Any]:
    """One of them holds: `A implies B` is written either(not A, B), with `not A` spelled out
    (absent(...), is_false(...)) rather than as if/then or `not`."""
    return {"anyOf": list(schemas)}


def absent(*names: str) -> dict[str, Any]:
    """None of the fields is given (each absent or null)."""
    return {"properties": {name: {"type": "null"} for name in names}}


def document_rules(schema: dict[str, Any], cls: type) -> None:
    """A model's json_schema_extra: its `schema_rules()` as the schema's allOf."""
    rules = cls.schema_rules()
    if rules:
        schema["allOf"] = rules


TokenId = Annotated[int, Field(json_schema_extra=rule(minimum=0,
                                                      exclusiveMaximum=Limit("vocab_size")))]
TokenIds = Annotated[list[TokenId], Field(json_schema_extra=rule(
    minItems=1, maxItems=Limit("max_prompt_tokens")))]  # one prompt's ids
PromptText = Annotated[str, Field(json_schema_extra=rule(minLength=1,
                                                         maxLength=Limit("max_prompt_chars")))]
StopString = Annotated[str, Field(json_schema_extra=rule(minLength=1,
                                                         maxLength=Limit("max_stop_chars")))]


def max_tokens_field(default: int | None) -> Any:
    return Field(default, json_schema_extra=rule(minimum=1, maximum=Limit("max_new_tokens")))


def model_field() -> Any:
    """`model`: a name this server serves (None or "": its first)."""
    return Field(None, json_schema_extra=rule(enum=Limit("served_models")))


TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"enum": ["text", "input_text", "output_text"]},
                            "text": {"type": "string"}}}


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestModel(OpenAIBaseModel):
    # JSON has no inf or NaN, but Python's json module reads them; they must not reach the sampler.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class RequestBody(RequestModel):
    """A whole request body: checked for lone surrogates and depth before its fields are read."""

    @model_validator(mode="before")
    @classmethod
    def _check_json(cls, data: Any) -> Any:
        check_json_value(data)
        return data


def check_json_value(value: Any) -> None:
    """ValueError naming the place of the first string that is not valid Unicode, or of the
    first value nested more than MAX_JSON_DEPTH deep (walked with a stack, not recursion)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{path or 'the body'} is nested more than {MAX_JSON_DEPTH} levels "
                             "deep")
        if isinstance(item, str):
            _check_unicode(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_unicode(key, f"{path}.{key}" if path else "a key")
                stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _check_unicode(text: Any, path: str) -> None:
    if isinstance(text, str) and not text.isascii():
        where = (path or "the body").encode("utf-8", "backslashreplace").decode()  # a bad key
        check_text(text, where)


# ---- errors -------------------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---- models, health -----------------------------------------------------------------------------
class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for a base
    max_model_len: int | None = None


class LoadLoRAAdapterRequest(RequestModel):
    """POST /v1/load_lora_adapter (--allow-runtime-lora-updating), as in vLLM."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(RequestModel):
    """POST /v1/unload_lora_adapter (--allow-runtime-lora-updating), as in vLLM."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- what both generation endpoints share -------------------------------------------------------
class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    """OpenAI's `response_format.json_schema`; the schema is always enforced, `strict` or not."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True,
                              allow_inf_nan=False)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    model_config = ConfigDict(json_schema_extra=document_rules)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @classmethod
    def schema_rules(cls) -> list[dict[str, Any]]:
        json_schema = {"required": ["json_schema"], "properties": {"json_schema": {
            "type": "object", **given("schema", "object")}}}
        return [either({"properties": {"type": {"enum": ["text", "json_object"]}}}, json_schema)]


class StructuredOutputsRequest(RequestModel):
    """vLLM's `structured_outputs` field: one of json, regex, choice, grammar, json_object."""

    json_schema: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = Field(None, json_schema_extra=rule(minLength=1))
    choice: list[str] | None = Field(None, json_schema_extra=rule(minItems=1))
    grammar: str | None = Field(None, json_schema_extra=rule(minLength=1))
    json_object: bool | None = None
    any_whitespace: bool = False
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True,
                              allow_inf_nan=False, json_schema_extra=document_rules)

    @classmethod
    def schema_rules(cls) -> list[dict[str, Any]]:
        """Exactly one of the five (json_object counts when true)."""
        return [{"oneOf": [given("json", "string", "object"), given("regex", "string"),
                           given("choice", "array"), given("grammar", "string"),
                           is_true("json_object")]}]


ONE_STRUCTURED = ("at most one of response_format (but type 'text'), structured_outputs and "
                  "guided_*")
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar")


def structured_absent(*except_: str) -> dict[str, Any]:
    """No structured-output constraint but in `except_` (response_format may be 'text')."""
    rules = absent(*(name for name in STRUCTURED_FIELDS if name not in except_))
    if "response_format" in rules["properties"]:  # null, or an object of type text
        rules["properties"]["response_format"] = {"properties": {"type": {"const": "text"}}}
    return rules


class SamplingRequest(RequestBody):
    """Sampling fields of /v1/completions and /v1/chat/completions, with vLLM's extras."""

    model_config = ConfigDict(json_schema_extra=document_rules)
    model: str | None = model_field()
    n: int = Field(1, ge=1, json_schema_extra=rule(maximum=Limit("max_n")),
                   description="more than 1 needs temperature > 0")
    best_of: int | None = Field(None, ge=1, json_schema_extra=rule(maximum=Limit("max_n")),
                                description="at least n; more than 1 needs temperature > 0")
    temperature: float | None = Field(None, json_schema_extra=rule(minimum=0))  # None: 1
    top_p: float | None = Field(None, json_schema_extra=rule(exclusiveMinimum=0, maximum=1))
    stop: StopString | list[StopString] | None = Field(
        None, json_schema_extra=rule(maxItems=Limit("max_stop")))
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, json_schema_extra=rule(minimum=-2, maximum=2))
    frequency_penalty: float | None = Field(0.0, json_schema_extra=rule(minimum=-2, maximum=2))
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=rule(
        propertyNames=Limit("token_id_names"), maxProperties=Limit("max_logit_bias"),
        additionalProperties={"type": "number", "minimum": -100, "maximum": 100}))
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, json_schema_extra=rule(minimum=-1,
                                                           maximum=Limit("vocab_size")))
    min_p: float | None = Field(None, json_schema_extra=rule(minimum=0, maximum=1))
    repetition_penalty: float | None = Field(None, json_schema_extra=rule(exclusiveMinimum=0))
    min_tokens: int = Field(0, json_schema_extra=rule(minimum=0),
                            description="at most max_tokens")
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(
        None, json_schema_extra=rule(maxItems=Limit("max_stop_token_ids")))
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[TokenId] | None = Field(
        None, json_schema_extra=rule(minItems=1, maxItems=Limit("max_allowed_token_ids")))
    bad_words: list[str] | None = Field(None, json_schema_extra=rule(
        maxItems=Limit("max_bad_words")))
    priority: int = 0  # lower runs first when the server uses --scheduling-policy priority
    cache_salt: str | None = None  # keeps this client's prefix-cache entries to itself
    use_beam_search: bool = False  # /v1/completions only; n (or best_of) is the beam width
    length_penalty: float = 1.0  # beam search only
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs, or vLLM's
    # older guided_* fields; at most one of them per request.
    response_format: ResponseFormat | None = Field(None, description=ONE_STRUCTURED)
    structured_outputs: StructuredOutputsRequest | None = Field(None, description=ONE_STRUCTURED)
    guided_json: str | dict[str, Any] | None = Field(None, description=ONE_STRUCTURED)
    guided_regex: str | None = Field(None, json_schema_extra=rule(minLength=1),
                                     description=ONE_STRUCTURED)
    guided_choice: list[str] | None = Field(None, json_schema_extra=rule(minItems=1),
                                            description=ONE_STRUCTURED)
    guided_grammar: str | None = Field(None, json_schema_extra=rule(minLength=1),
                                       description=ONE_STRUCTURED)

    @classmethod
    def schema_rules(cls) -> list[dict[str, Any]]:
        """What one field's value asks of another, as conditions of the request's schema.

        A fuzzer's schema engine multiplies the alternatives of these conditions out over the
        whole request, and schemathesis's gives up on the chat request at about twice the eight
        it has now. So these rules are stated in the fields' descriptions only: best_of >= n
        and min_tokens <= max_tokens (JSON Schema cannot compare two fields), n > 1 needing
        temperature > 0, and at most one structured output (six alternatives on its own)."""
        return [either(absent("stream_options"), is_true("stream"))]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, reason) for every field that asks for what the engine does not do yet."""
        extras = sorted(name for name, value in (self.model_extra or {}).items()
                        if value not in UNSUPPORTED_VLLM_EXTRAS.get(name, (value,)))
        if extras:
            return [(extras[0], f"{extras[0]} is not supported by this server")]
        if self.use_beam_search and self._structured_sources():
            return [("use_beam_search", "beam search cannot be combined with structured "
                                        "outputs (response_format, structured_outputs, guided_*)")]
        return []

    def invalid(self) -> list[tuple[str, str]]:
        """(param, reason) for combinations that are wrong whatever the engine supports."""
        problems = []
        if self.stream_options is not None and not self.stream:
            problems.append(("stream_options", "stream_options is only allowed when stream is "
                                               "true"))
        bias = self.logit_bias or {}
        if any(not -100 <= v <= 100 for v in bias.values()):
            problems.append(("logit_bias", "logit_bias values must be in [-100, 100]"))
        if any(not TOKEN_ID_KEY.fullmatch(k) for k in bias):
            problems.append(("logit_bias", "logit_bias keys must be token ids"))
        sources = self._structured_sources()
        if len(sources) > 1:
            problems.append((sources[1], f"give one structured-output constraint, not several: "
                                         f"got {', '.join(sources)}"))
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and (
                fmt.json_schema is None or fmt.json_schema.json_schema is None):
            problems.append(("response_format", "response_format of type json_schema needs "
                                                "json_schema.schema"))
        return problems

    def _structured_sources(self) -> list[str]:
        """The fields of this request that ask for a structured output."""
        sources = [name for name in ("structured_outputs", "guided_json", "guided_regex",
                                     "guided_choice", "guided_grammar")
                   if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            sources.insert(0, "response_format")
        return sources

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one constraint asked for, in whichever field; ValueError if it is malformed."""
        fmt, so = self.response_format, self.structured_outputs
        if fmt is not None and fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt is not None and fmt.type == "json_schema":
            return StructuredOutputsParams(json=fmt.json_schema.json_schema)
        if so is not None:
            return StructuredOutputsParams(json=so.json_schema, regex=so.regex, choice=so.choice,
                                           grammar=so.grammar, json_object=so.json_object,
                                           any_whitespace=so.any_whitespace)
        guided = {"json": self.guided_json, "regex": self.guided_regex,
                  "choice": self.guided_choice, "grammar": self.guided_grammar}
        given = {name: value for name, value in guided.items() if value is not None}
        return StructuredOutputsParams(**given) if given else None

    def to_sampling_params(self, output_kind: RequestOutputKind) -> SamplingParams:
        raise NotImplementedError  # each endpoint's request knows its max_tokens and logprobs

    def token_id_fields(self) -> dict[str, list[int]]:
        """Every field that holds token ids, to check against the vocabulary."""
        return {"stop_token_ids": self.stop_token_ids or [],
                "allowed_token_ids": self.allowed_token_ids or [],
                "logit_bias": [int(k) for k in self.logit_bias or {}]}

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         output_kind: RequestOutputKind, **extra: Any) -> SamplingParams:
        """Raises ValueError (a 400 for the caller) for out-of-range values."""
        return SamplingParams(
            n=self.n,
            best_of=self.best_of,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=self.structured_outputs_params(),
            output_kind=output_kind,
            **extra,
        )


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.total_tokens = self.prompt_tokens + self.completion_tokens


# ---- /v1/completions ----------------------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    # A text, texts, one prompt's token ids, or token ids per prompt
    prompt: (PromptText
             | Annotated[list[PromptText], Field(json_schema_extra=rule(
                 minItems=1, maxItems=Limit("max_prompts")))]
             | TokenIds
             | Annotated[list[TokenIds], Field(json_schema_extra=rule(
                 minItems=1, maxItems=Limit("max_prompts")))])
    max_tokens: int | None = max_tokens_field(COMPLETIONS_MAX_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = Field(None, json_schema_extra=rule(maxLength=0))  # not supported

    @classmethod
    def schema_rules(cls) -> list[dict[str, Any]]:
        # beam search answers whole, takes no structured output, and bounds length_penalty
        beam_search = structured_absent()
        beam_search["properties"].update(stream={"const": False}, length_penalty={
            "minimum": -MAX_LENGTH_PENALTY, "maximum": MAX_LENGTH_PENALTY})
        return [*super().schema_rules(), either(is_false("use_beam_search"), beam_search)]

    def unsupported(self) -> list[tuple[str, str]]:
        problems = super().unsupported()
        if self.use_beam_search and self.stream:
            problems.append(("stream", "use_beam_search answers whole: set stream to false"))
        if self.suffix:
            problems.append(("suffix", "suffix (fill-in-the-middle) is not supported"))
        return problems

    def to_sampling_params(self, output_kind: RequestOutputKind) -> SamplingParams:
        # echo with logprobs lists the prompt's tokens too, so it needs their logprobs.
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self.max_tokens, self.logprobs, output_kind,
                                     prompt_logprobs=prompt_logprobs)


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's extra: the stop string or token that ended it


class CompletionResponse(OpenAIBaseModel):
    """Both the whole response and each streamed chunk (OpenAI uses one object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions -----------------------------------------------------------------------
class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # the schema is enforced whenever a call is forced, strict or not


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str = Field(min_length=1)


class NamedToolChoice(RequestModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: call exactly this one."""

    type: Literal["function"]
    function: FunctionName


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: str
    # a text, or text parts: {"type": "text", "text": ...}
    content: str | list[dict[str, Any]] | None = Field(None, json_schema_extra=rule(
        maxLength=Limit("max_prompt_chars"), items=TEXT_PART))
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant's earlier reasoning (not templated)


TOOL_CHOICES = ("none", "auto", "required")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # None: the server's --max-tokens-default, at most what the context leaves
    max_tokens: int | None = max_tokens_field(None)
    max_completion_tokens: int | None = max_tokens_field(None)  # OpenAI's newer name
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = Field(None, description="distinct function names")
    # None: "auto" when there are tools, else "none" (OpenAI's defaults)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="required and a named function need tools (and the name one of "
                          "them), and are a structured-output constraint of their own (no "
                          "response_format, structured_outputs or guided_* with them); auto "
                          "(the default with tools) needs the server's "
                          "--enable-auto-tool-choice")
    parallel_tool_calls: bool = True
    use_beam_search: bool = Field(False, json_schema_extra=rule(const=False))  # completions only
    # vLLM's extras for the chat template
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False  # the answer starts with the last message's content (same role only)
    chat_template: str | None = Field(None, min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the template

    @classmethod
    def schema_rules(cls) -> list[dict[str, Any]]:
        return [*super().schema_rules(),
                either(absent("top_logprobs"), is_true("logprobs")),
                either(is_false("continue_final_message"), NO_GENERATION_PROMPT)]

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def unsupported(self) -> list[tuple[str, str]]:
        problems = super().unsupported()
        if self.use_beam_search:
            problems.append(("use_beam_search", "beam search is offered on /v1/completions"))
        return problems

    def invalid(self) -> list[tuple[str, str]]:
        problems = super().invalid()
        if self.top_logprobs is not None and not self.logprobs:
            problems.append(("top_logprobs", "top_logprobs needs logprobs to be true"))
        if self.add_generation_prompt and self.continue_final_message:
            problems.append(("continue_final_message", "continue_final_message and "
                             "add_generation_prompt cannot both be true"))
        return problems + self._tool_problems()

    def _tool_problems(self) -> list[tuple[str, str]]:
        choice = self.tool_choice
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and not self.tools:
            return [("tool_choice", "tool_choice 'required' or a named function needs tools")]
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            return [("tools", "tools must have distinct function names")]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            return [("tool_choice", f"tool_choice names function {choice.function.name!r}, "
                                    "which is not among the tools")]
        if forced and self._structured_sources():
            return [("tool_choice", "tool_choice 'required' or a named function is a "
                                    "structured-output constraint of its own: give no "
                                    f"{self._structured_sources()[0]} with it")]
        return []

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        from pagedllm.entrypoints.openai.tool_calls import forced_tool_constraint

        forced = forced_tool_constraint(self)
        return forced if forced is not None else super().structured_outputs_params()

    def to_sampling_params(self, output_kind: RequestOutputKind) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_completion_tokens is None else \
            self.max_completion_tokens  # not `or`: 0 is a value (and refused), not unset
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, output_kind)


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatLogprobEntry] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # with --reasoning-parser
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(OpenAIBaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIBaseModel):
    """A streamed call: its first delta has id, type and name; later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# ---- /tokenize, /detokenize ---------------------------------------------------------------------
NO_GENERATION_PROMPT = {"required": ["add_generation_prompt"],
                        "properties": {"add_generation_prompt": {"const": False}}}


class TokenizeRequest(RequestBody):
    """Either `prompt` (text) or `messages` (rendered through the chat template first)."""

    model_config = ConfigDict(json_schema_extra=document_rules)
    model: str | None = model_field()
    prompt: str | None = Field(None, json_schema_extra=rule(maxLength=Limit("max_prompt_chars")))
    messages: list[ChatMessage] | None = Field(None, json_schema_extra=rule(minItems=1))
    add_special_tokens: bool = True  # for `prompt`; a chat template writes its own
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    tools: list[ChatTool] | None = None  # for `messages`: what the template receives
    chat_template: str | None = Field(None, min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None

    @classmethod
    def schema_rules(cls) -> list[dict[str, Any]]:
        return [{"oneOf": [given("prompt", "string"), given("messages", "array")]},
                either(absent("messages"), is_false("continue_final_message"),
                       NO_GENERATION_PROMPT)]


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = model_field()
    tokens: list[TokenId] = Field(json_schema_extra=rule(maxItems=Limit("max_model_len")))


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
