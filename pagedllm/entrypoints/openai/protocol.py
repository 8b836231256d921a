"""Request and response bodies of the OpenAI API, as pydantic models.

Request models accept unknown fields (clients send newer OpenAI fields all the time) and each
knows how to become `SamplingParams`. Fields the engine cannot honour yet are listed by
`unsupported()` so that the server can answer 400 instead of quietly ignoring them.

Requests are read strictly: "true" is not a boolean and "2" not an integer (pydantic's lax mode
would coerce both). Every string anywhere in a body must be valid Unicode (JSON's "\\ud800"
escape can carry a lone surrogate, which no tokenizer takes) and a body may nest at most
MAX_JSON_DEPTH levels deep (a deeper JSON schema would exhaust the stack when copied).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedllm.sampling_params import (
    SEED_RANGE,
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
)

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs; the sampler's top-k cost grows with it
MAX_JSON_DEPTH = 64  # nesting of a request body (a JSON schema's, mostly)


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
    if not isinstance(text, str) or text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = (path or "the body").encode("utf-8", "backslashreplace").decode()  # a bad key
        raise ValueError(f"{where} is not valid UTF-8 text: it has a lone surrogate at "
                         f"character {exc.start}") from None


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
    max_model_len: int | None = None


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
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(RequestModel):
    """vLLM's `structured_outputs` field: one of json, regex, choice, grammar, json_object."""

    json_schema: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    any_whitespace: bool = False
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True,
                              allow_inf_nan=False)


class SamplingRequest(RequestBody):
    """Sampling fields of /v1/completions and /v1/chat/completions, with vLLM's extras."""

    model: str | None = None
    n: int = Field(1, ge=1)  # at most the server's --max-n (limits.py), as is best_of
    best_of: int | None = Field(None, ge=1)
    temperature: float | None = None  # None: OpenAI's default of 1
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int = 0  # lower runs first when the server uses --scheduling-policy priority
    cache_salt: str | None = None  # keeps this client's prefix-cache entries to itself
    use_beam_search: bool = False  # /v1/completions only; n (or best_of) is the beam width
    length_penalty: float = 1.0  # beam search only
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs, or vLLM's
    # older guided_* fields; at most one of them per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, reason) for every field that asks for what the engine does not do yet."""
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
        if any(not k.lstrip("-").isdigit() for k in bias):
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
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

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
class ChatMessage(RequestModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: as long as the model and the KV cache allow
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM's extras for the chat template
    continue_final_message: bool = False

    def unsupported(self) -> list[tuple[str, str]]:
        problems = super().unsupported()
        if self.use_beam_search:
            problems.append(("use_beam_search", "beam search is offered on /v1/completions"))
        if self.tools:
            problems.append(("tools", "tool calling is not supported by this server yet"))
        if self.tool_choice not in (None, "none", "auto"):
            problems.append(("tool_choice", "tool calling is not supported by this server yet"))
        return problems

    def invalid(self) -> list[tuple[str, str]]:
        problems = super().invalid()
        if self.top_logprobs is not None and not self.logprobs:
            problems.append(("top_logprobs", "top_logprobs needs logprobs to be true"))
        if self.add_generation_prompt and self.continue_final_message:
            problems.append(("continue_final_message", "continue_final_message and "
                             "add_generation_prompt cannot both be true"))
        return problems

    def to_sampling_params(self, output_kind: RequestOutputKind) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
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


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None


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
class TokenizeRequest(RequestBody):
    """Either `prompt` (text) or `messages` (rendered through the chat template first)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for `prompt`; a chat template writes its own
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
