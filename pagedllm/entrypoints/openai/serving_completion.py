"""POST /v1/completions: one engine request per prompt (n choices each), merged into one
response or one stream. Choice i*n + j is the j-th completion of prompt i, as in vLLM."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.async_llm import NewRequest, OutputStream
from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.logprobs import completion_logprobs
from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from pagedllm.entrypoints.openai.serving_base import (
    OpenAIServing,
    count_usage,
    json_response,
    random_id,
)
from pagedllm.entrypoints.openai.streaming import cancel_on_disconnect, sse_response
from pagedllm.inputs import PromptType
from pagedllm.outputs import CompletionOutput, RequestOutput


@dataclass
class _Job:
    """One /v1/completions call. Its prompts became engine requests `ids[i]`; every output
    delta becomes one choice delta, streamed as it is or added up into `whole`."""

    request: CompletionRequest
    id: str
    model: str
    ids: list[str]
    echo: list[str]  # the text to put before each of prompt i's choices ("" without echo)
    tokenizer: Any
    whole: dict[int, CompletionChoice] = field(default_factory=dict)  # index -> choice so far
    created: int = field(default_factory=lambda: int(time.time()))  # the same in every chunk

    def __post_init__(self) -> None:
        self.prompt_index = {request_id: i for i, request_id in enumerate(self.ids)}
        self.echoed: set[int] = set()  # choices whose echo went out already
        self.text_offset: dict[int, int] = {}  # choice -> where its next logprob token starts

    def response(self, choices: list[CompletionChoice],
                 usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)

    def chunks(self, output: RequestOutput) -> list[CompletionResponse]:
        """One stream chunk per choice delta that carries anything."""
        return [self.response([choice]) for choice in self._choices(output)
                if choice.text or choice.logprobs or choice.finish_reason]

    def usage_chunk(self, usage: UsageInfo) -> CompletionResponse:
        return self.response([], usage)

    def merge(self, output: RequestOutput) -> None:
        for choice in self._choices(output):
            merge_choice(self.whole, choice)

    def whole_response(self, usage: UsageInfo) -> CompletionResponse:
        return self.response([self.whole[index] for index in sorted(self.whole)], usage)

    def _choices(self, output: RequestOutput) -> list[CompletionChoice]:
        """The choice deltas of one engine output."""
        return [self._choice(output, completion) for completion in output.outputs]

    def _choice(self, output: RequestOutput, completion: CompletionOutput) -> CompletionChoice:
        prompt = self.prompt_index[output.request_id]
        index = prompt * self.request.n + completion.index
        echo = self.request.echo and index not in self.echoed
        self.echoed.add(index)
        text = (self.echo[prompt] if echo else "") + completion.text
        return CompletionChoice(index=index, text=text,
                                logprobs=self._logprobs(index, output, completion, echo),
                                finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason)

    def _logprobs(self, index: int, output: RequestOutput, completion: CompletionOutput,
                  echo: bool):
        if self.request.logprobs is None:
            return None
        token_ids, entries = list(completion.token_ids), list(completion.logprobs or [])
        if echo:  # the prompt's tokens come first, the first of them without a logprob
            prompt_entries = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
            token_ids = output.prompt_token_ids + token_ids
            entries = list(prompt_entries) + entries
        logprobs, self.text_offset[index] = completion_logprobs(
            token_ids, entries, self.request.logprobs, self.text_offset.get(index, 0),
            self.tokenizer)
        return logprobs


def merge_choice(whole: dict[int, CompletionChoice], delta: CompletionChoice) -> None:
    """Add one choice delta to the whole response's choices."""
    choice = whole.setdefault(delta.index, CompletionChoice(index=delta.index, text=""))
    choice.text += delta.text
    if delta.logprobs is not None:
        if choice.logprobs is None:
            choice.logprobs = delta.logprobs.model_copy(deep=True)
        else:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(choice.logprobs, name).extend(getattr(delta.logprobs, name))
    if delta.finish_reason is not None:
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason


def beam_params(request: CompletionRequest) -> BeamSearchParams:
    try:
        return BeamSearchParams(beam_width=max(request.n, request.best_of or 1),
                                max_tokens=request.max_tokens or 16,
                                ignore_eos=request.ignore_eos,
                                length_penalty=request.length_penalty,
                                include_stop_str_in_output=request.include_stop_str_in_output)
    except ValueError as exc:
        raise OpenAIError.bad_request(str(exc)) from exc


def best_beams(finals: list[RequestOutput], n: int) -> tuple[list[CompletionChoice], UsageInfo]:
    """The n best beams of prompt i as choices i*n + j, and the usage of those beams."""
    choices, usage = [], UsageInfo()
    for i, output in enumerate(finals):
        best = output.outputs[:n]
        count_usage(usage, output, best)
        choices += [CompletionChoice(index=i * n + j, text=c.text, finish_reason=c.finish_reason)
                    for j, c in enumerate(best)]
    return choices, usage


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = self.check_request(request)
        prompts = self._prompts(request.prompt, request.cache_salt)
        params = self.sampling_params(request)
        request_id = random_id("cmpl")
        if request.use_beam_search:
            work = self._beam_search(request, request_id, model, prompts)
            return await cancel_on_disconnect(raw_request, work)
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        echo = await self._echo_texts(request, prompts)
        job = _Job(request, request_id, model, ids, echo, self.tokenizer)
        stream = await self.submit([NewRequest(r, p, params, request.priority,
                                               self.models.lora_request(model))
                                    for r, p in zip(ids, prompts)])
        if request.stream:
            usage_chunk = job.usage_chunk if request.include_usage else None
            return sse_response(self.stream(stream, job.chunks, usage_chunk))
        return await cancel_on_disconnect(raw_request, self._collect(job, stream))

    async def _beam_search(self, request: CompletionRequest, request_id: str, model: str,
                           prompts: list[PromptType]) -> Response:
        """One engine beam search per prompt (engine/beam_search.py); its n best beams are the
        choices."""
        params = beam_params(request)
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = await self.submit([NewRequest(r, p, params, request.priority,
                                               self.models.lora_request(model))
                                    for r, p in zip(ids, prompts)])
        finals: dict[str, RequestOutput] = {}  # each search sends one output, when it ends

        def keep(output: RequestOutput) -> None:
            finals[output.request_id] = output

        await self.collect(stream, keep)  # its usage counts every beam; the response's, n
        choices, usage = best_beams([finals[r] for r in ids], request.n)
        return json_response(CompletionResponse(id=request_id, created=int(time.time()),
                                                model=model, choices=choices, usage=usage))

    def _prompts(self, prompt: str | list, cache_salt: str | None) -> list[PromptType]:
        extra = {"cache_salt": cache_salt} if cache_salt is not None else {}
        if isinstance(prompt, str):
            return [{"prompt": prompt, **extra}]
        if not prompt:
            raise OpenAIError.bad_request("prompt must not be an empty list", "prompt")
        if isinstance(prompt[0], str):
            return [{"prompt": p, **extra} for p in prompt]
        token_lists = [prompt] if isinstance(prompt[0], int) else prompt
        for ids in token_lists:
            self.check_token_ids(ids, "prompt")
        return [{"prompt_token_ids": list(ids), **extra} for ids in token_lists]

    async def _echo_texts(self, request: CompletionRequest,
                          prompts: list[PromptType]) -> list[str]:
        if not request.echo:
            return [""] * len(prompts)
        if all("prompt" in p for p in prompts):
            return [p["prompt"] for p in prompts]
        tokenizer = self.require_tokenizer()
        return await self.engine.run_input_work(
            lambda: [tokenizer.decode(p["prompt_token_ids"]) for p in prompts])

    async def _collect(self, job: _Job, stream: OutputStream) -> Response:
        usage = await self.collect(stream, job.merge)
        return json_response(job.whole_response(usage))
