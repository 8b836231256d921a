"""The pooling routes: /v1/embeddings, /pooling, /classify, /score, /rerank (and /v1/rerank).

Each input becomes one pooling request, added together with the call's others and batched by the
engine like any request; the response waits for all of them. Only a pooling model serves these
routes (runner "pooling"); a generative server answers them with a 400 saying so, and a pooling
server answers /v1/completions and /v1/chat/completions likewise (api_server.py).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence

from pagedllm.engine.async_llm import NewRequest
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol_pooling import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingData,
    PoolingInput,
    PoolingRequest,
    PoolingResponse,
    PoolingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from pagedllm.entrypoints.openai.serving_base import (
    ENGINE_ERRORS,
    OpenAIServing,
    engine_error,
    random_id,
)
from pagedllm.entrypoints.pooling import (
    cosine,
    cross_encoder_input,
    is_cross_encoder,
    score_pairs,
)
from pagedllm.inputs import PromptType, TokensPrompt
from pagedllm.outputs import PoolingRequestOutput
from pagedllm.pooling_params import PoolingParams

POOLING_PATHS = ("/v1/embeddings", "/pooling", "/classify", "/score", "/rerank", "/v1/rerank")


def prompts_of(value: PoolingInput) -> list[PromptType]:
    """OpenAI's `input`: a text, texts, one input's token ids, or token ids per input."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise OpenAIError.bad_request("input is empty", "input")
    if isinstance(value[0], int):
        return [TokensPrompt(prompt_token_ids=list(value))]
    prompts: list[PromptType] = []
    for item in value:
        if isinstance(item, str) and not item:
            raise OpenAIError.bad_request("input holds an empty string", "input")
        if isinstance(item, list) and not item:
            raise OpenAIError.bad_request("input holds an empty list of token ids", "input")
        prompts.append(item if isinstance(item, str) else TokensPrompt(prompt_token_ids=item))
    return prompts


def encode_base64(values: list[float]) -> str:
    """OpenAI's encoding_format="base64": little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def encoded(data: list, encoding_format: str) -> list | str:
    """A result as the request asked: as it is, or base64 (a matrix row after row)."""
    if encoding_format != "base64":
        return data
    return encode_base64([x for row in data for x in row] if data and isinstance(data[0], list)
                         else data)


def is_pooling_model(model_config) -> bool:
    """Does the engine serve pooling requests (runner "pooling")? A config without the
    field (a stand-in engine's) generates."""
    return getattr(model_config, "runner", "generate") == "pooling"


def generative_server_error(task: str = "pooling") -> OpenAIError:
    return OpenAIError.bad_request(
        f"this server's model generates text; {task} requests need a pooling model: start "
        f"the server with --runner pooling (an embedding or cross-encoder model)")


class OpenAIServingPooling(OpenAIServing):
    @property
    def tasks(self) -> tuple[str, ...]:
        return getattr(self.engine.model_config, "pooling_tasks", ())

    def require_task(self, task: str) -> None:
        if not is_pooling_model(self.engine.model_config):
            raise generative_server_error(task)
        if task not in self.tasks:
            raise OpenAIError.bad_request(f"this model does not support the {task!r} task (it "
                                          f"supports {', '.join(self.tasks)})")

    async def run(self, inputs: Sequence[tuple[PromptType, PoolingParams]]
                  ) -> list[PoolingRequestOutput]:
        """Every input as one engine request, added together; their outputs in input order. An
        engine failure is a 500; a cancelled call (disconnect) aborts what still runs."""
        base = random_id("pool")
        ids = [f"{base}-{i}" for i in range(len(inputs))]
        stream = await self.submit([NewRequest(request_id, prompt, params)
                                    for request_id, (prompt, params) in zip(ids, inputs)])
        results: dict[str, PoolingRequestOutput] = {}
        try:
            async for output in stream:
                if not isinstance(output, PoolingRequestOutput) or output.finish_reason != "stop":
                    reason = getattr(output, "finish_reason", "abort")
                    raise OpenAIError(500, f"the engine ended the request ({reason})",
                                      code="engine_error")
                results[output.request_id] = output
        except ENGINE_ERRORS as exc:
            raise engine_error(exc) from exc
        finally:
            stream.abort()
        return [results[request_id] for request_id in ids]

    # ---- routes ---------------------------------------------------------------------------------
    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        model = self.models.resolve(request.model)
        outputs = await self.run_task(request.input, task="embed", dimensions=request.dimensions,
                                      normalize=request.normalize)
        data = [EmbeddingData(index=i, embedding=encoded(o.outputs.embedding,
                                                         request.encoding_format))
                for i, o in enumerate(outputs)]
        return EmbeddingResponse(id=random_id("embd"), model=model, data=data,
                                 usage=usage(outputs))

    async def pooling(self, request: PoolingRequest) -> PoolingResponse:
        model = self.models.resolve(request.model)
        outputs = await self.run_task(request.input, task="encode",
                                      pooling_type=request.pooling_type)
        data = [PoolingData(index=i, data=encoded(o.outputs.data, request.encoding_format))
                for i, o in enumerate(outputs)]
        return PoolingResponse(id=random_id("pool"), model=model, data=data,
                               usage=usage(outputs))

    async def run_task(self, value: PoolingInput, **fields) -> list[PoolingRequestOutput]:
        """One pooling request per input of `value` with PoolingParams(**fields)."""
        self.require_task(fields["task"])
        try:
            params = PoolingParams(**fields)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc)) from exc
        return await self.run([(p, params) for p in prompts_of(value)])

    async def classify(self, request: ClassificationRequest) -> ClassificationResponse:
        model = self.models.resolve(request.model)
        outputs = await self.run_task(request.input, task="classify")
        labels = getattr(self.engine.model_config.hf_config, "id2label", None) or {}
        data = []
        for i, output in enumerate(outputs):
            probs = output.outputs.probs
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(ClassificationData(index=i, label=labels.get(best), probs=probs,
                                           num_classes=len(probs)))
        return ClassificationResponse(id=random_id("classify"), model=model, data=data,
                                      usage=usage(outputs))

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        model = self.models.resolve(request.model)
        self.require_task("score")
        try:
            pairs = score_pairs(request.text_1, request.text_2)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc)) from exc
        scores, tokens = await self.pair_scores(pairs)
        return ScoreResponse(id=random_id("score"), model=model,
                             data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                             usage=PoolingUsage(prompt_tokens=tokens, total_tokens=tokens))

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        model = self.models.resolve(request.model)
        self.require_task("score")
        if not request.query:
            raise OpenAIError.bad_request("query is empty", "query")
        if not request.documents:
            raise OpenAIError.bad_request("documents is empty", "documents")
        scores, tokens = await self.pair_scores([(request.query, d) for d in request.documents])
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if request.top_n:
            order = order[: request.top_n]
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=RerankDocument(text=request.documents[i])
                                if request.return_documents else None) for i in order]
        return RerankResponse(id=random_id("rerank"), model=model, results=results,
                              usage=RerankUsage(total_tokens=tokens))

    async def pair_scores(self, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        """Each pair's score and the tokens it took: a cross-encoder's relevance, or the cosine
        similarity of the two texts' embeddings (each distinct text embedded once)."""
        if is_cross_encoder(self.tasks):
            try:
                inputs = [cross_encoder_input(self.tokenizer, q, d) for q, d in pairs]
            except ValueError as exc:
                raise OpenAIError.bad_request(str(exc)) from exc
            outputs = await self.run([(i.prompt, i.params) for i in inputs])
            return [o.outputs.score for o in outputs], usage(outputs).prompt_tokens
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        if "" in texts:
            raise OpenAIError.bad_request("score: a text is empty")
        outputs = await self.run([(t, PoolingParams(task="embed")) for t in texts])
        vectors = {t: o.outputs.embedding for t, o in zip(texts, outputs)}
        return [cosine(vectors[q], vectors[d]) for q, d in pairs], usage(outputs).prompt_tokens


def usage(outputs: list[PoolingRequestOutput]) -> PoolingUsage:
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return PoolingUsage(prompt_tokens=tokens, total_tokens=tokens)
