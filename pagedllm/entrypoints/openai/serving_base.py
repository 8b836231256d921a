"""What the completion and chat handlers share: checks, SamplingParams, handing requests over."""

from __future__ import annotations

import uuid

from fastapi.responses import Response
from pydantic import BaseModel

from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError, NewRequest, OutputStream
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import SamplingRequest
from pagedllm.entrypoints.openai.serving_models import ServedModels
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def json_response(body: BaseModel) -> Response:
    # pydantic writes a non-finite float as null; json.dumps would write invalid JSON (-Infinity).
    return Response(body.model_dump_json(), media_type="application/json")


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, models: ServedModels) -> None:
        self.engine = engine
        self.models = models
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size

    def check_request(self, request: SamplingRequest) -> str:
        """400 for a bad or not-yet-supported field, 404 for another model; returns the name."""
        model = self.models.resolve(request.model)
        for param, reason in request.invalid() + request.unsupported():
            raise OpenAIError.bad_request(reason, param)
        return model

    def sampling_params(self, request: SamplingRequest) -> SamplingParams:
        # Always deltas: a stream forwards them and a whole response adds them up, so an
        # abort (disconnect, shutdown) never loses what was already delivered.
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
        try:
            return await self.engine.add_requests(requests)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc)) from exc
        except EngineDeadError as exc:
            raise OpenAIError(503, str(exc), code="engine_unavailable") from exc
