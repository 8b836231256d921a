"""`pagedllm serve`'s own options (the engine's come from EngineArgs); cheap to import, so that
`pagedllm --help` does not load torch."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pagedllm.config import parse_bytes
from pagedllm.entrypoints.openai.limits import RequestLimits, add_limit_args
from pagedllm.entrypoints.openai.reasoning_parsers import REASONING_PARSERS, get_reasoning_parser
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS, get_tool_parser

API_KEY_ENV = "PAGEDLLM_API_KEY"
VLLM_API_KEY_ENV = "VLLM_API_KEY"
# vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING, under our prefix (or --allow-runtime-lora-updating)
RUNTIME_LORA_ENV = "PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING"
DEFAULT_MAX_BODY = "8MiB"  # ~100 times the longest prompt the default model takes, as text
DEFAULT_MAX_WAITING = 1024
DEFAULT_STALL_TIMEOUT_S = 60.0
DEFAULT_STATS_INTERVAL_S = 10.0  # vLLM's: an engine stats line this often while there is work


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
    chat_template: str | None = None  # the template's text (--chat-template), over the model's
    enable_auto_tool_choice: bool = False  # tool_choice "auto" reads calls with tool_call_parser
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # CORS (vLLM's defaults: any origin, method and header; no credentials)
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    log_requests: bool = False  # one line per request received and finished
    max_log_len: int | None = None  # prompt characters a logged request shows (None: all)
    log_stats_interval_s: float | None = DEFAULT_STATS_INTERVAL_S  # None: no stats lines
    generation_config: str = "auto"  # sampling defaults: auto (the model's), vllm (none), PATH

    def __post_init__(self) -> None:
        if self.max_request_body_bytes < 1:
            raise ValueError(f"--max-request-body-size must be positive, got "
                             f"{self.max_request_body_bytes} bytes")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser "
                             f"(one of {', '.join(sorted(TOOL_PARSERS))})")
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # an unknown name fails here, with the list
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"--max-log-len must be at least 0, got {self.max_log_len}")
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
                       args.allow_runtime_lora_updating),
                   chat_template=load_chat_template(args.chat_template),
                   enable_auto_tool_choice=args.enable_auto_tool_choice,
                   tool_call_parser=args.tool_call_parser,
                   reasoning_parser=args.reasoning_parser,
                   allowed_origins=tuple(args.allowed_origins),
                   allowed_methods=tuple(args.allowed_methods),
                   allowed_headers=tuple(args.allowed_headers),
                   allow_credentials=args.allow_credentials,
                   log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
                   log_stats_interval_s=None if args.disable_log_stats else
                   DEFAULT_STATS_INTERVAL_S,
                   generation_config=args.generation_config)


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
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
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
    parser.add_argument("--disable-access-log", "--disable-uvicorn-access-log",
                        action="store_true", dest="disable_access_log",
                        help="do not log every HTTP request (uvicorn's access log)")
    parser.add_argument("--root-path", default="",
                        help="the path prefix a proxy serves this server under (ASGI root_path)")
    parser.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this key file")
    parser.add_argument("--ssl-certfile", default=None, help="... and this certificate file")
    parser.add_argument("--allowed-origins", type=json_list, default=["*"],
                        help="CORS: origins allowed, as a JSON list")
    parser.add_argument("--allowed-methods", type=json_list, default=["*"],
                        help="CORS: methods allowed, as a JSON list")
    parser.add_argument("--allowed-headers", type=json_list, default=["*"],
                        help="CORS: headers allowed, as a JSON list")
    parser.add_argument("--allow-credentials", action="store_true",
                        help="CORS: allow credentials (cookies, authorization headers)")
    parser.add_argument("--enable-log-requests", action="store_true",
                        help="log each request as it arrives (prompt, sampling parameters) and "
                             "as it ends (token counts, latencies); off by default")
    parser.add_argument("--max-log-len", type=int, default=None,
                        help="prompt characters (and token ids) a logged request shows "
                             "(default: all)")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help=f"no engine stats line every {DEFAULT_STATS_INTERVAL_S:g} s while "
                             "there is work")
    parser.add_argument("--generation-config", default="auto",
                        help="sampling defaults for fields a request leaves unset: auto (the "
                             "model's generation_config.json), vllm (none: OpenAI's defaults) "
                             "or a folder holding a generation_config.json")
    parser.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=None,
                        metavar="NAME=PATH",
                        help="LoRA adapters to serve (needs --enable-lora): name=path, or JSON "
                             "{\"name\": ..., \"path\": ..., \"base_model_name\": ...}; "
                             "clients select one with model=NAME")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                             f"(or env {RUNTIME_LORA_ENV}=1); off by default, as in vLLM")
    add_chat_args(parser)
    add_limit_args(parser)


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("chat")
    group.add_argument("--chat-template", default=None,
                       help="a Jinja chat template, or a file holding one, used instead of the "
                            "model's own (a request's chat_template overrides it)")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="read tool calls out of answers to tool_choice 'auto' (the default "
                            "when tools are given) with --tool-call-parser")
    group.add_argument("--tool-call-parser", default=None,
                       help=f"the model's tool-call format: {', '.join(sorted(TOOL_PARSERS))}")
    group.add_argument("--reasoning-parser", default=None,
                       help="put the model's thinking in reasoning_content: "
                            f"{', '.join(sorted(REASONING_PARSERS))}")


def json_list(text: str) -> list[str]:
    """An argparse type: a JSON list of strings (vLLM's spelling of the CORS options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON list: {text!r}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"not a JSON list of strings: {text!r}")
    return value


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path or the template itself; ValueError for neither."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def resolve_api_key(cli_value: str | None) -> str | None:
    """--api-key wins, then the environment (ours, then vLLM's name for it, so that a vLLM
    deployment's settings carry over); an empty value means no key."""
    return cli_value or os.environ.get(API_KEY_ENV) or os.environ.get(VLLM_API_KEY_ENV) or None
