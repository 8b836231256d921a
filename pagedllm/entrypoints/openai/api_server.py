"""The FastAPI app (`build_app`) and the uvicorn process around it (`run_server`).

Routes:
    GET  /health /version /metrics /v1/models
    POST /v1/completions /v1/chat/completions /tokenize /detokenize
    GET  /debug/step_stats   what the engine's steps batched (tests and benchmarks read it)
With an API key, every /v1 and /debug route needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import socket
from dataclasses import asdict, dataclass

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.config import EngineArgs
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.cli_args import resolve_api_key
from pagedllm.entrypoints.openai.errors import error_response, install_error_handlers
from pagedllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_models import ServedModels
from pagedllm.entrypoints.openai.serving_tokens import OpenAIServingTokens
from pagedllm.logger import init_logger

logger = init_logger(__name__)

PROTECTED_PREFIXES = ("/v1", "/debug")
MAX_STEP_RECORDS = 2000  # per /debug/step_stats answer
ENGINE_WATCH_INTERVAL_S = 0.5  # how often the server checks that its engine still runs
DEAD_ENGINE_GRACE_S = 1.0  # after the engine died: time for responses to send its error
EXIT_ENGINE_DIED = 1  # the process's status when it stopped because its engine did

router = APIRouter()


@dataclass
class ServerState:
    engine: AsyncLLM
    models: ServedModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    tokens: OpenAIServingTokens
    metrics: ServerMetrics


def _state(request: Request) -> ServerState:
    return request.app.state.pagedllm


# ---- routes -------------------------------------------------------------------------------------
@router.get("/health")
async def health(request: Request) -> Response:
    if not _state(request).engine.is_running:
        return error_response(503, "the engine has stopped", code="engine_unavailable")
    return Response(status_code=200)


@router.get("/version")
async def version() -> dict[str, str]:
    from pagedllm import __version__

    return {"version": __version__}


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return _state(request).models.model_list()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await _state(request).completion.create_completion(body, request)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await _state(request).chat.create_chat_completion(body, request)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await _state(request).tokens.tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await _state(request).tokens.detokenize(body)


@router.get("/metrics")
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
class APIKeyMiddleware:
    """401 for a protected route without `Authorization: Bearer <key>` (a plain ASGI
    middleware, so streaming responses and disconnect detection pass through untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_protected(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "missing or wrong API key: send the header "
                                       "'Authorization: Bearer <key>'", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key)


def _is_protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)


def build_app(engine: AsyncLLM, served_model_names: list[str],
              api_key: str | None = None) -> FastAPI:
    from pagedllm import __version__

    config = engine.model_config
    models = ServedModels(list(served_model_names), str(config.source.path), config.max_model_len)
    app = FastAPI(title="pagedllm", version=__version__)
    app.state.pagedllm = ServerState(
        engine=engine, models=models,
        completion=OpenAIServingCompletion(engine, models),
        chat=OpenAIServingChat(engine, models),
        tokens=OpenAIServingTokens(engine, models),
        metrics=ServerMetrics(engine),
    )
    app.include_router(router)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


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
                 watch_interval: float = ENGINE_WATCH_INTERVAL_S) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.watch_interval = watch_interval
        self.engine_died = False

    @property
    def exit_code(self) -> int:
        return EXIT_ENGINE_DIED if self.engine_died else 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        watchdog = asyncio.create_task(self.watch_engine())
        try:
            await super().serve(sockets)
        finally:
            watchdog.cancel()

    async def watch_engine(self) -> None:
        """Poll the engine; once it has stopped, shut the server down. The engine failed its
        requests as it stopped, so they only need a moment to send that error: after
        DEAD_ENGINE_GRACE_S the shutdown stops waiting for them (there is nothing to drain)."""
        while self.engine.is_running:
            await asyncio.sleep(self.watch_interval)
        logger.error("the engine has stopped; shutting the server down (exit status %d)",
                     EXIT_ENGINE_DIED)
        self.engine_died = True
        self.should_exit = True
        await asyncio.sleep(DEAD_ENGINE_GRACE_S)
        self.force_exit = True

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
    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args))
    try:
        names = args.served_model_name or [default_served_name(args, engine)]
        app = build_app(engine, names, api_key)
        config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off",
                                log_level=args.uvicorn_log_level,
                                access_log=not args.disable_access_log,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5)
        logger.info("serving %s as %s on http://%s:%d%s", engine.model_config.source.path.name,
                    ", ".join(names), args.host, args.port, " (API key required)" if api_key else "")
        # uvicorn re-raises SIGINT/SIGTERM once it has shut down, so that the handler it
        # replaced runs; with these (log and return) a signalled stop exits with status 0.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _note_signal)
        server = DrainingServer(config, engine, args.shutdown_timeout)
        server.run()
        return server.exit_code
    finally:
        engine.shutdown()
