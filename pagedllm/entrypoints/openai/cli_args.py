"""`pagedllm serve`'s own options (the engine's come from EngineArgs); cheap to import, so that
`pagedllm --help` does not load torch."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "PAGEDLLM_API_KEY"


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients put in 'model' (default: the model argument)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 (or env {API_KEY_ENV})")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGINT/SIGTERM "
                             "before they are aborted")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--disable-access-log", action="store_true",
                        help="do not log every HTTP request")


def resolve_api_key(cli_value: str | None) -> str | None:
    """--api-key wins, then the environment; an empty value means no key."""
    return cli_value or os.environ.get(API_KEY_ENV) or None
