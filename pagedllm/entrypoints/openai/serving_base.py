"""What the completion and chat handlers share: checks, SamplingParams, handing requests over,
and reading the engine's outputs back as a stream (`stream`) or a whole response (`collect`),
with one error handling and one usage count for both."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

from pagedllm.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineOverloadedError,
    EngineStepError,
    NewRequest,
    OutputStream,
)
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.limits import RequestLimits
from pagedllm.entrypoints.openai.protocol import SamplingRequest, UsageInfo
from pagedllm.entrypoints.openai.server_logging import RequestLogger
from pagedllm.entrypoints.openai.serving_models import ServedModels
from pagedllm.entrypoints.openai.streaming import SSE_DONE, sse_event
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

# What an OutputStream raises when the engine fails its requests mid-way (a failed step, or
# the engine stopping): a 500 for the request, not a crash of the server.
ENGINE_ERRORS = (EngineStepError, EngineDeadError)
RETRY_AFTER_S = 1  # what an overloaded server tells a client to wait (Retry-After)

ToChunks = Callable[[RequestOutput], Iterable[BaseModel]]  # one engine output -> SSE chunks
UsageChunk = Callable[[UsageInfo], BaseModel]  # the usage -> the stream's last chunk


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def json_response(body: BaseModel) -> Response:
    # pydantic writes a non-finite float as null; json.dumps would write invalid JSON (-Infinity).
    return Response(body.model_dump_json(), media_type="application/json")


def engine_error(exc: Exception) -> OpenAIError:
    return OpenAIError(500, str(exc), code="engine_error")


def count_usage(usage: UsageInfo, output: RequestOutput,
                completions: Sequence[CompletionOutput] | None = None) -> None:
    """Add one (delta) engine output to `usage`: the new tokens of `completions` (all of the
    output's choices by default), and the prompt once, when the request finishes, because its
    n choices share one prompt."""
    prompt_tokens = len(output.prompt_token_ids) if output.finished else 0
    choices = output.outputs if completions is None else completions
    usage.add(prompt_tokens, sum(len(c.token_ids) for c in choices))


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, models: ServedModels,
                 limits: RequestLimits | None = None, chat_template: str | None = None,
                 sampling_defaults: dict[str, Any] | None = None,
                 request_logger: RequestLogger | None = None) -> None:
        self.engine = engine
        self.chat_template = chat_template  # --chat-template: overrides the model's own
        # --generation-config: values for the sampling fields a request leaves unset (None)
        self.sampling_defaults = sampling_defaults or {}
        self.request_logger = request_logger  # --enable-log-requests
        self.models = models
        self.limits = limits or RequestLimits()
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size

    def check_request(self, request: SamplingRequest) -> str:
        """400 for a bad or not-yet-supported field or one over this server's limits, 404 for
        another model; returns the model's name."""
        model = self.models.resolve(request.model)
        problems = request.invalid() + self.limits.problems(request) + request.unsupported()
        for param, reason in problems:
            raise OpenAIError.bad_request(reason, param)
        return model

    def sampling_params(self, request: SamplingRequest) -> SamplingParams:
        # Always deltas: a stream forwards them and a whole response adds them up, so an
        # abort (disconnect, shutdown) never loses what was already delivered.
        for name, value in self.sampling_defaults.items():
            if getattr(request, name, False) is None:
                setattr(request, name, value)
        try:
            params = request.to_sampling_params(RequestOutputKind.DELTA)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc)) from exc
        for param, token_ids in request.token_id_fields().items():
            self.check_token_ids(token_ids, param)
        return params

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise OpenAIError.bad_request(
                f"{param} must be token ids in [0, {self.vocab_size}); got {bad[:5]}", param)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise OpenAIError.bad_request("this server runs without a tokenizer "
                                          "(skip_tokenizer_init); send token ids")
        return self.tokenizer

    async def submit(self, requests: list[NewRequest]) -> OutputStream:
        """Hand the requests to the engine; its ValueError (e.g. prompt too long) is a 400."""
        if self.request_logger is not None:
            for new in requests:
                prompt = new.prompt if isinstance(new.prompt, dict) else {"prompt": new.prompt}
                self.request_logger.received(new.request_id, prompt.get("prompt"),
                                             list(prompt.get("prompt_token_ids") or []),
                                             new.params)
        try:
            return await self.engine.add_requests(requests)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc)) from exc
        except EngineDeadError as exc:
            raise OpenAIError(503, str(exc), code="engine_unavailable") from exc
        except EngineOverloadedError as exc:
            raise OpenAIError(503, str(exc), code="overloaded",
                              headers={"Retry-After": str(RETRY_AFTER_S)}) from exc

    async def stream(self, outputs: OutputStream, to_chunks: ToChunks,
                     usage_chunk: UsageChunk | None = None,
                     head: Sequence[BaseModel] = ()) -> AsyncIterator[str]:
        """One streamed response as SSE events: `head`, the chunks of every engine output, the
        usage chunk (when given, i.e. when the client asked for usage), then [DONE].

        The status line went out with the first event, so an engine failure becomes an error
        event. However the stream ends, a client's disconnect included (Starlette then closes
        this generator), what is still running is aborted.
        """
        usage = UsageInfo()
        try:
            for chunk in head:
                yield sse_event(chunk)
            async for output in outputs:
                count_usage(usage, output)
                for chunk in to_chunks(output):
                    yield sse_event(chunk)
            if usage_chunk is not None:
                yield sse_event(usage_chunk(usage))
        except ENGINE_ERRORS as exc:
            yield sse_event(engine_error(exc).body())
        finally:
            outputs.abort()  # a no-op once finished; frees the KV blocks of a disconnected client
        yield SSE_DONE

    async def collect(self, outputs: OutputStream,
                      take: Callable[[RequestOutput], None]) -> UsageInfo:
        """Hand every engine output of a whole (non-streamed) response to `take`; returns the
        usage. An engine failure is a 500; however it ends, a cancellation on disconnect
        included, what is still running is aborted."""
        usage = UsageInfo()
        try:
            async for output in outputs:
                count_usage(usage, output)
                take(output)
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from exc
        finally:
            outputs.abort()
        return usage
