"""`pagedllm serve`'s own options (the engine's come from EngineArgs); cheap to import, so that
`pagedllm --help` does not load torch."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from pagedllm.config import parse_bytes
from pagedllm.entrypoints.openai.limits import RequestLimits, add_limit_args

API_KEY_ENV = "PAGEDLLM_API_KEY"
DEFAULT_MAX_BODY = "8MiB"  # ~100 times the longest prompt the default model takes, as text
DEFAULT_MAX_WAITING = 1024
DEFAULT_STALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServerOptions:
    """What the HTTP layer enforces; `pagedllm serve` fills it from its options."""

    limits: RequestLimits = field(default_factory=RequestLimits)
    max_request_body_bytes: int = parse_bytes(DEFAULT_MAX_BODY)
    public_metrics: bool = False  # /metrics without the API key
    # /health answers 503 once the engine has had work but finished no turn for this long
    health_stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_request_body_bytes < 1:
            raise ValueError(f"--max-request-body-size must be positive, got "
                             f"{self.max_request_body_bytes} bytes")
        if not self.health_stall_timeout_s > 0:  # 0 or less: /health would always say 503
            raise ValueError(f"--health-stall-timeout must be positive, got "
                             f"{self.health_stall_timeout_s}")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerOptions:
        return cls(limits=RequestLimits.from_cli_args(args),
                   max_request_body_bytes=parse_bytes(args.max_request_body_size),
                   public_metrics=args.public_metrics,
                   health_stall_timeout_s=args.health_stall_timeout)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients put in 'model' (default: the model argument)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             f"(or env {API_KEY_ENV})")
    parser.add_argument("--public-metrics", action="store_true",
                        help="serve /metrics without the API key (for a Prometheus scraper)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGINT/SIGTERM "
                             "before they are aborted")
    parser.add_argument("--max-request-body-size", default=DEFAULT_MAX_BODY,
                        help="largest request body, e.g. 8MiB; a larger one gets a 413 "
                             f"(default {DEFAULT_MAX_BODY})")
    parser.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING,
                        help="requests accepted but not yet scheduled; beyond it a 503 with "
                             f"Retry-After (default {DEFAULT_MAX_WAITING})")
    parser.add_argument("--health-stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S,
                        help="seconds the engine may hold work without finishing a step before "
                             f"/health says 503 (default {DEFAULT_STALL_TIMEOUT_S:g})")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--disable-access-log", action="store_true",
                        help="do not log every HTTP request")
    add_limit_args(parser)


def resolve_api_key(cli_value: str | None) -> str | None:
    """--api-key wins, then the environment; an empty value means no key."""
    return cli_value or os.environ.get(API_KEY_ENV) or None
