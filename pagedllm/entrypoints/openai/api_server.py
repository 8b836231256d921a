"""The FastAPI app (`build_app`) and the uvicorn process around it (`run_server`).

Routes:
    GET  /health /version /metrics /v1/models /v1/models/{id}
    POST /v1/completions /v1/chat/completions /v1/responses /tokenize /detokenize
         (a generative model)
    POST /v1/embeddings /pooling /classify /score /rerank /v1/rerank   (a pooling model:
         serving_pooling.py; each side answers the other's routes with a 400 saying so)
    POST /v1/load_lora_adapter /v1/unload_lora_adapter   only with --allow-runtime-lora-updating
    GET  /debug/step_stats   what the engine's steps batched (tests and benchmarks read it)
    GET  /dashboard (/dashboard/stream)   the live dashboard (dashboard.py)
With an API key, every route but /health, the dashboard's page (no data in it) and /metrics with
--public-metrics needs `Authorization: Bearer KEY`: the tokenizer routes cost as much as a
prompt does.

Cheap refusals come first, in ASGI middleware: a missing key (401), then a body over
--max-request-body-size (413), both before a byte of the body is parsed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response

from pagedllm.config import EngineArgs
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.cli_args import (
    DEFAULT_STALL_TIMEOUT_S,
    ServerOptions,
    resolve_api_key,
)
from pagedllm.entrypoints.openai.dashboard import install_dashboard
from pagedllm.entrypoints.openai.errors import (
    DOCUMENTED_ERRORS,
    OpenAIError,
    error_response,
    install_error_handlers,
)
from pagedllm.entrypoints.openai.generation_config import load_sampling_defaults
from pagedllm.entrypoints.openai.limits import ModelBounds, document_limits
from pagedllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pagedllm.entrypoints.openai.middleware import (
    APIKeyMiddleware,
    BodySizeLimitMiddleware,
    RequestIdMiddleware,
)
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from pagedllm.entrypoints.openai.protocol_pooling import (
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingRequest,
    PoolingResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
)
from pagedllm.entrypoints.openai.protocol_responses import ResponseObject, ResponsesRequest
from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pagedllm.entrypoints.openai.server_logging import RequestLogger, StatsLogger
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_models import ServedModels
from pagedllm.entrypoints.openai.serving_pooling import (
    POOLING_PATHS,
    OpenAIServingPooling,
    generative_server_error,
    is_pooling_model,
)
from pagedllm.entrypoints.openai.serving_responses import OpenAIServingResponses
from pagedllm.entrypoints.openai.serving_tokens import OpenAIServingTokens
from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser
from pagedllm.logger import init_logger

logger = init_logger(__name__)

OPEN_PATHS = ("/health",)  # answered without the API key (and /metrics by a flag)
API_KEY_SCHEME = "APIKey"  # its name in the OpenAPI document
MAX_STEP_RECORDS = 2000  # per /debug/step_stats answer
ENGINE_WATCH_INTERVAL_S = 0.5  # how often the server checks that its engine still runs
DEAD_ENGINE_GRACE_S = 1.0  # after the engine died: time for responses to send its error
EXIT_ENGINE_DIED = 1  # the process's status when it stopped because its engine did

router = APIRouter(responses=DOCUMENTED_ERRORS)
lora_router = APIRouter(responses=DOCUMENTED_ERRORS)  # --allow-runtime-lora-updating only
pooling_router = APIRouter(responses=DOCUMENTED_ERRORS)  # a pooling model's (--runner pooling)


@dataclass
class ServerState:
    engine: AsyncLLM
    models: ServedModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    responses: OpenAIServingResponses
    tokens: OpenAIServingTokens
    pooling: OpenAIServingPooling
    metrics: ServerMetrics
    options: ServerOptions


def _state(request: Request) -> ServerState:
    return request.app.state.pagedllm


def generated(whole: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    """The 200 of a generation route, for the OpenAPI document: a whole JSON response, or with
    stream=true server-sent events, each a chunk, an error, or [DONE] (streaming.py)."""
    event_data = {"anyOf": [
        {"const": "[DONE]"},
        {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": f"#/components/schemas/{chunk.__name__}"},
            {"$ref": "#/components/schemas/ErrorResponse"}]}}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": event_data}}
    return {200: {"model": whole, "description": "The completion, or with stream=true its events",
                  "content": {"text/event-stream": {"schema": event}}}}


def response_events() -> dict[int | str, dict[str, Any]]:
    """The 200 of /v1/responses: the response, or with stream=true its events (each names its
    `type` and `sequence_number`; serving_responses.py)."""
    event_data = {"contentMediaType": "application/json", "contentSchema": {
        "type": "object", "required": ["type", "sequence_number"],
        "properties": {"type": {"type": "string"}, "sequence_number": {"type": "integer"}}}}
    event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "data": event_data}}
    return {200: {"model": ResponseObject, "description": "The response, or with stream=true "
                  "its events", "content": {"text/event-stream": {"schema": event}}}}


# ---- routes -------------------------------------------------------------------------------------
@router.get("/health", response_class=Response,
            responses={200: {"description": "The engine runs", "content": None}})
async def health(request: Request) -> Response:
    """200 while the engine runs and makes progress; 503 once it has stopped, or has held work
    without finishing a step for longer than --health-stall-timeout."""
    state = _state(request)
    if not state.engine.is_running:
        return error_response(503, "the engine has stopped", code="engine_unavailable")
    stalled = state.engine.stalled_for()
    if stalled > state.options.health_stall_timeout_s:
        return error_response(503, f"the engine has not finished a step for {stalled:.0f} s "
                                   "while requests wait", code="engine_stalled")
    return Response(status_code=200)


@router.get("/version")
async def version() -> dict[str, str]:
    from pagedllm import __version__

    return {"version": __version__}


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return _state(request).models.model_list()


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """One served model (the SDK's models.retrieve); 404 for a name this server does not
    serve."""
    return _state(request).models.card(model_id)


@lora_router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> str:
    """Serve another LoRA adapter as model=lora_name; 400 naming what is wrong with it."""
    state = _state(request)
    return await state.models.load(state.engine, body)


@lora_router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> str:
    """Stop serving an adapter (requests in flight under it finish); 404 if unknown."""
    state = _state(request)
    return await state.models.unload(state.engine, body)


@router.post("/v1/completions", responses=generated(CompletionResponse, CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    _require_generator(request)
    return await _state(request).completion.create_completion(body, request)


@router.post("/v1/chat/completions",
             responses=generated(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    _require_generator(request)
    return await _state(request).chat.create_chat_completion(body, request)


@router.post("/v1/responses", responses=response_events())
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """OpenAI's Responses API, made by the chat path (serving_responses.py)."""
    _require_generator(request)
    return await _state(request).responses.create_response(body, request)


def _require_generator(request: Request) -> None:
    config = _state(request).engine.model_config
    if is_pooling_model(config):
        raise OpenAIError.bad_request(
            f"this server's model is a pooling model (--runner pooling): it serves "
            f"{', '.join(config.pooling_tasks)} requests (/v1/embeddings, /score, /rerank, "
            f"/classify, /pooling), not text generation")


# ---- pooling models -----------------------------------------------------------------------------
@pooling_router.post("/v1/embeddings")
async def create_embedding(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    return await _state(request).pooling.embeddings(body)


@pooling_router.post("/pooling")
async def create_pooling(body: PoolingRequest, request: Request) -> PoolingResponse:
    return await _state(request).pooling.pooling(body)


@pooling_router.post("/classify")
async def create_classify(body: ClassificationRequest,
                          request: Request) -> ClassificationResponse:
    return await _state(request).pooling.classify(body)


@pooling_router.post("/score")
async def create_score(body: ScoreRequest, request: Request) -> ScoreResponse:
    return await _state(request).pooling.score(body)


@pooling_router.post("/rerank")
@pooling_router.post("/v1/rerank")
async def create_rerank(body: RerankRequest, request: Request) -> RerankResponse:
    return await _state(request).pooling.rerank(body)


async def not_a_pooling_model() -> Response:
    """A generative server's answer on the pooling routes (kept out of its document)."""
    raise generative_server_error()


def _add_pooling_routes(app: FastAPI, model_config: Any) -> None:
    if is_pooling_model(model_config):
        app.include_router(pooling_router)
        return
    for path in POOLING_PATHS:
        app.add_api_route(path, not_a_pooling_model, methods=["POST"], include_in_schema=False)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await _state(request).tokens.tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await _state(request).tokens.detokenize(body)


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/debug/step_stats")
async def step_stats(request: Request, since: int = 0) -> dict:
    """The engine's counters and its step records after step `since` (request ids included),
    so that a client can see which of its requests ran in the same step."""
    engine = _state(request).engine
    records = await engine.step_records(since, limit=MAX_STEP_RECORDS)
    stats = engine.stats
    return {**asdict(stats), "kv_cache_usage": stats.kv_cache_usage, "steps": records}


# ---- the app ------------------------------------------------------------------------------------
def build_app(engine: AsyncLLM, served_model_names: list[str], api_key: str | None = None,
              options: ServerOptions | None = None) -> FastAPI:
    from pagedllm import __version__

    options = options or ServerOptions()
    config = engine.model_config
    models = ServedModels(list(served_model_names), str(config.source.path), config.max_model_len)
    _serve_loras(engine, models, options)
    engine.default_max_tokens = options.limits.default_max_tokens(
        getattr(config, "default_max_tokens", None))
    app = FastAPI(title="pagedllm", version=__version__)
    shared = serving_options(engine, options)
    chat = OpenAIServingChat(engine, models, options.limits, options.chat_template,
                             **shared, **chat_parsers(options))
    app.state.pagedllm = ServerState(
        engine=engine, models=models,
        completion=OpenAIServingCompletion(engine, models, options.limits, **shared),
        chat=chat, responses=OpenAIServingResponses(chat),
        tokens=OpenAIServingTokens(engine, models, options.limits, options.chat_template),
        pooling=OpenAIServingPooling(engine, models, options.limits),
        metrics=ServerMetrics(engine, models.default),
        options=options,
    )
    app.include_router(router)
    _add_pooling_routes(app, config)
    if options.allow_runtime_lora_updating:
        app.include_router(lora_router)
    page_paths = install_dashboard(app, engine)
    install_error_handlers(app)
    open_paths = OPEN_PATHS + page_paths + (("/metrics",) if options.public_metrics else ())
    processor = getattr(engine, "input_processor", None)
    _document(app, options, ModelBounds(
        served_names=models.names, vocab_size=config.vocab_size,
        max_model_len=config.max_model_len,
        max_prompt_chars=getattr(processor, "max_prompt_chars", None),
        cache_tokens=getattr(processor, "cache_tokens", None)),
        open_paths=open_paths if api_key else None)
    # Added last runs first: the key is checked before the body is read at all, CORS (whose
    # preflight carries no key) before that, and every response gets its X-Request-Id.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=options.max_request_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=open_paths)
    app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                       allow_methods=list(options.allowed_methods),
                       allow_headers=list(options.allowed_headers),
                       allow_credentials=options.allow_credentials)
    app.add_middleware(RequestIdMiddleware)
    return app


def serving_options(engine: AsyncLLM, options: ServerOptions) -> dict[str, Any]:
    """What every generation handler takes from the options: sampling defaults (logged, as
    vLLM does) and the request logger."""
    defaults = load_sampling_defaults(options.generation_config,
                                      engine.model_config.source.path)
    if defaults:
        logger.info("sampling defaults from the model's generation config (a request's own "
                    "values win): %s", defaults)
    request_logger = RequestLogger(options.max_log_len) if options.log_requests else None
    if request_logger is not None:
        engine.add_observer(request_logger.finished)
    return {"sampling_defaults": defaults, "request_logger": request_logger}


def chat_parsers(options: ServerOptions) -> dict[str, Any]:
    """The tool-call parser (only with --enable-auto-tool-choice) and reasoning parser."""
    auto = options.enable_auto_tool_choice and options.tool_call_parser is not None
    return {"tool_parser": get_tool_parser(options.tool_call_parser) if auto else None,
            "reasoning_parser": get_reasoning_parser(options.reasoning_parser)
            if options.reasoning_parser else None}


def _serve_loras(engine: AsyncLLM, models: ServedModels, options: ServerOptions) -> None:
    """Check and register the --lora-modules adapters (ValueError naming a bad one: the server
    does not start)."""
    if options.allow_runtime_lora_updating and not engine.engine.args.enable_lora:
        raise ValueError("--allow-runtime-lora-updating needs --enable-lora")
    for module in options.lora_modules:
        lora = models.new_lora(module.name, module.path, module.base_model_name)
        engine.engine.add_lora(lora)
        models.loras[lora.lora_name] = lora


def _document(app: FastAPI, options: ServerOptions, model: ModelBounds,
              open_paths: tuple[str, ...] | None) -> None:
    """The OpenAPI document states this server's request caps, its model's bounds and, with an
    API key (`open_paths` not None), which routes need it."""
    plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document_limits(plain_openapi(), options.limits, model)
            if open_paths is not None:
                _document_api_key(app.openapi_schema, open_paths)
        return app.openapi_schema

    app.openapi = openapi


def _document_api_key(schema: dict[str, Any], open_paths: tuple[str, ...]) -> None:
    schema.setdefault("components", {})["securitySchemes"] = {API_KEY_SCHEME: {
        "type": "http", "scheme": "bearer", "description": "the server's --api-key"}}
    for path, operations in schema["paths"].items():
        if path not in open_paths:
            for operation in operations.values():
                operation["security"] = [{API_KEY_SCHEME: []}]


# ---- the process --------------------------------------------------------------------------------
class DrainingServer(uvicorn.Server):
    """On SIGINT/SIGTERM uvicorn stops accepting connections and waits for open responses.

    In-flight requests get `drain_timeout` seconds to finish on their own; then the engine
    aborts them, so each stream still ends properly (a finish chunk with reason 'abort', then
    [DONE]) rather than being cut off mid-way.

    If the engine dies (its thread or process is gone), the server stops too and `exit_code`
    says so: a server that answers every request with an error would otherwise look alive
    to whatever supervises it, which restarts a process that exits but not one that stays.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, drain_timeout: float,
                 watch_interval: float = ENGINE_WATCH_INTERVAL_S,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
                 stats_logger: StatsLogger | None = None) -> None:
        super().__init__(config)
        self.stats_logger = stats_logger
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.watch_interval = watch_interval
        self.stall_timeout = stall_timeout
        self.engine_died = False

    @property
    def exit_code(self) -> int:
        return EXIT_ENGINE_DIED if self.engine_died else 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        tasks = [asyncio.create_task(self.watch_engine())]
        if self.stats_logger is not None:
            tasks.append(asyncio.create_task(self.stats_logger.run()))
        try:
            await super().serve(sockets)
        finally:
            for task in tasks:
                task.cancel()

    async def watch_engine(self) -> None:
        """Poll the engine; log when it stalls (and when it recovers); once it has stopped,
        shut the server down. The engine failed its requests as it stopped, so they only need
        a moment to send that error: after DEAD_ENGINE_GRACE_S the shutdown stops waiting for
        them (there is nothing to drain)."""
        stalled = False
        while self.engine.is_running:
            await asyncio.sleep(self.watch_interval)
            stalled = self._note_stall(stalled)
        logger.error("the engine has stopped; shutting the server down (exit status %d)",
                     EXIT_ENGINE_DIED)
        self.engine_died = True
        self.should_exit = True
        await asyncio.sleep(DEAD_ENGINE_GRACE_S)
        self.force_exit = True

    def _note_stall(self, was_stalled: bool) -> bool:
        seconds = self.engine.stalled_for()
        stalled = seconds > self.stall_timeout
        if stalled and not was_stalled:
            logger.error("the engine has held work for %.0f s without finishing a step; "
                         "/health says 503 until it does", seconds)
        elif was_stalled and not stalled:
            logger.warning("the engine makes progress again; /health says 200")
        return stalled

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.drain_timeout, self.engine.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def _note_signal(signum: int, _frame) -> None:
    logger.info("stopped by %s", signal.Signals(signum).name)


def default_served_name(args: argparse.Namespace, engine: AsyncLLM) -> str:
    return args.model or engine.model_config.source.path.stem


def run_server(args: argparse.Namespace) -> int:
    api_key = resolve_api_key(args.api_key)
    options = ServerOptions.from_cli_args(args)  # a bad option fails before the model loads
    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args),
                                       max_waiting_requests=args.max_waiting_requests)
    try:
        names = args.served_model_name or [default_served_name(args, engine)]
        app = build_app(engine, names, api_key, options)
        config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off",
                                log_level=args.uvicorn_log_level,
                                access_log=not args.disable_access_log,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5,
                                root_path=args.root_path, ssl_keyfile=args.ssl_keyfile,
                                ssl_certfile=args.ssl_certfile)
        scheme = "https" if args.ssl_certfile else "http"
        logger.info("serving %s as %s on %s://%s:%d%s%s", engine.model_config.source.path.name,
                    ", ".join(names), scheme, args.host, args.port, args.root_path,
                    " (API key required)" if api_key else "")
        # uvicorn re-raises SIGINT/SIGTERM once it has shut down, so that the handler it
        # replaced runs; with these (log and return) a signalled stop exits with status 0.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _note_signal)
        interval = options.log_stats_interval_s
        server = DrainingServer(config, engine, args.shutdown_timeout,
                                stall_timeout=options.health_stall_timeout_s,
                                stats_logger=StatsLogger(engine, interval) if interval else None)
        server.run()
        return server.exit_code
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`python -m pagedllm.entrypoints.openai.api_server --model M ...`, as vLLM's docs and
    deployment manifests spell it: `pagedllm serve M ...` under another name."""
    from pagedllm.entrypoints.cli import DefaultsHelpFormatter, add_serve_args, run_serve

    parser = argparse.ArgumentParser(prog="python -m pagedllm.entrypoints.openai.api_server",
                                     formatter_class=DefaultsHelpFormatter)
    add_serve_args(parser, model_flag=True)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
