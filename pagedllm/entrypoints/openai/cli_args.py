"""`pagedllm serve`'s own options (the engine's come from EngineArgs); cheap to import, so that
`pagedllm --help` does not load torch."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from pagedllm.config import parse_bytes
from pagedllm.entrypoints.openai.limits import RequestLimits, add_limit_args

API_KEY_ENV = "PAGEDLLM_API_KEY"
# vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING, under our prefix (or --allow-runtime-lora-updating)
RUNTIME_LORA_ENV = "PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING"
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
    lora_modules: tuple[LoRAModule, ...] = ()  # adapters served from the start
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and unload

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
                   health_stall_timeout_s=args.health_stall_timeout,
                   lora_modules=tuple(args.lora_modules or ()),
                   allow_runtime_lora_updating=runtime_lora_allowed(
                       args.allow_runtime_lora_updating))


@dataclass(frozen=True, slots=True)
class LoRAModule:
    """One --lora-modules entry: `name=path`, or vLLM's JSON form."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModule:
    """'name=path' or '{"name": ..., "path": ..., "base_model_name": ...}' (argparse type)."""
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--lora-modules: bad JSON {text!r}: {exc}") from exc
        unknown = set(raw) - {"name", "path", "base_model_name"} if isinstance(raw, dict) else ()
        if not isinstance(raw, dict) or unknown or not all(
                isinstance(raw.get(k), str) and raw[k] for k in ("name", "path")):
            raise argparse.ArgumentTypeError(
                f"--lora-modules: JSON must be {{\"name\": ..., \"path\": ..., "
                f"\"base_model_name\": ...}} with non-empty strings, got {text!r}")
        return LoRAModule(raw["name"], raw["path"], raw.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules takes name=path (or JSON), got "
                                         f"{text!r}")
    return LoRAModule(name, path)


def runtime_lora_allowed(flag: bool) -> bool:
    return flag or os.environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true", "yes")


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
    parser.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=None,
                        metavar="NAME=PATH",
                        help="LoRA adapters to serve (needs --enable-lora): name=path, or JSON "
                             "{\"name\": ..., \"path\": ..., \"base_model_name\": ...}; "
                             "clients select one with model=NAME")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                             f"(or env {RUNTIME_LORA_ENV}=1); off by default, as in vLLM")
    add_limit_args(parser)


def resolve_api_key(cli_value: str | None) -> str | None:
    """--api-key wins, then the environment; an empty value means no key."""
    return cli_value or os.environ.get(API_KEY_ENV) or None
